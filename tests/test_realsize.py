"""bench/realsize.py --dry-run: the GPU checks' code at tiny shapes on the CPU, so that it cannot
rot before a GPU is at hand. One full dry run (one check forced to fail, one to run out of
memory) and one short run whose check hangs past its time guard; each in a subprocess, as a user
runs it. About 1.5 minutes on the project's 2-core machine when it is quiet."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT

import tah
import train
from bench import realsize
from bench.measure import gib

PARTS = ["stage1", "attention", "decode", "pipeline"]
FAILS, OOM = "stage1-0.6b-8192-always", "stage1-1.7b-4096-oracle"


def dry_run(tmp, *flags: str, fault: str = "") -> tuple[subprocess.CompletedProcess, dict]:
    """Runs the dry run with REALSIZE_FAULT=fault; returns the process and its JSON report."""
    cmd = [sys.executable, str(ROOT / "bench" / "realsize.py"), "--dry-run", "--json",
           str(tmp / "report.json"), "--work", str(tmp / "work"), *flags]
    p = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=400,
                       env=os.environ | {"REALSIZE_FAULT": fault, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    return p, json.loads((tmp / "report.json").read_text())


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("realsize")
    return tmp, *dry_run(tmp, fault=f"{FAILS}=raise,{OOM}=oom")


def test_every_check_has_rows_and_the_table_is_the_json(full):
    _, p, report = full
    assert [c["id"] for c in report["checks"]] == [c.id for c in realsize.GPU_CHECKS]
    assert {c["part"] for c in report["checks"]} == set(PARTS)
    assert report["mode"] == "dry" and report["env"]["torch"] == torch.__version__
    table = p.stdout.splitlines()
    assert table[0].startswith("realsize on CPU dry-run") and torch.__version__ in table[0]
    rows = [line for line in table if line.startswith("| ") and not line.startswith("| part ")]
    want = [f"| {c['part']} | {r.get('what', c['id'])} | "
            f"{r['result'].replace('|', chr(92) + '|')} | {c['seconds']:.0f} | `{c['command']}` |"
            for c in report["checks"] for r in c["rows"]]
    assert rows == want  # the same rows, in the same order, nothing else
    assert all(r["result"].startswith("CPU dry-run: ") for c in report["checks"] for r in c["rows"])
    for c in report["checks"]:
        assert c["command"] == f"python bench/realsize.py --parts {c['id']} --dry-run"


def test_a_failing_check_is_a_row_and_the_others_complete(full):
    _, _, report = full
    status = {c["id"]: c for c in report["checks"]}
    assert status[FAILS]["status"] == "failed" and "injected" in status[FAILS]["error"]
    assert status[FAILS]["rows"][0]["result"].startswith("CPU dry-run: **FAILED**: exit 1")
    assert status[OOM]["status"] == "out of memory"
    assert "**OUT OF MEMORY**" in status[OOM]["rows"][0]["result"]
    assert all(c["status"] == "ok" for i, c in status.items() if i not in (FAILS, OOM))


def test_stage1_figures(full):
    _, _, report = full
    for c in [c for c in report["checks"] if c["part"] == "stage1" and c["status"] == "ok"]:
        f = c["figures"]
        tokens = int(c["id"].split("-")[2]) // 64  # the dry run's lengths
        assert f["length"] == tokens and f["steps"] == 3 and f["chunk"] == train.CE_CHUNK
        share = 1.0 if f["policy"] == "always" else round(0.15 * tokens) / tokens
        assert f["iterating"] == pytest.approx(share) and f["hard"] == round(share * tokens)
        assert f["tokens_per_second"] == pytest.approx(tokens / f["seconds"])
        assert 0 < f["seconds"] < c["seconds"] and f["reserved"] is None  # no CUDA allocator
        # every phase of the step was marked, each peak above what the process held before
        assert f["start"] < f["weights"] and min(f[ph] for ph in realsize.PHASES) > f["start"]
        assert f["peak"] == max(f[ph] for ph in realsize.PHASES)
        row = c["rows"][0]["result"]  # the table says what the JSON holds
        assert f"{tokens} tokens, {share:.1%} iterating, fp32: peak {gib(f['peak'])} (" in row
        assert f"layers {gib(f['layers'])}, optimizer {gib(f['optimizer'])}; " in row
        assert f"{f['tokens_per_second']:,.0f} tokens/s ({f['seconds']:.2f} s a step)" in row


def test_attention_backends_agree_with_the_reference(full):
    _, _, report = full
    c = next(c for c in report["checks"] if c["id"] == "attention")
    backends, rows = c["figures"]["backends"], {r["what"]: r["result"] for r in c["rows"]}
    assert list(backends) == list(realsize.BACKENDS)
    assert backends["math"]["accepted"]  # the math kernel takes any mask
    accepted = [b for b, f in backends.items() if f["accepted"]]
    assert c["figures"]["default"] and set(c["figures"]["default"]) <= set(accepted)
    for b, f in backends.items():
        row = rows[f"SDPA backend {b} alone"]
        if f["accepted"]:
            assert f["max_diff"] < 1e-5 and f["agrees"]  # fp32 in the dry run
            assert all(ms > 0 for ms in f["ms"])
            assert row.startswith("CPU dry-run: accepted: ")
        else:
            assert f["reason"] and row == f"CPU dry-run: refused: {f['reason']}"
    assert "4 query / 2 kv heads of 16" in rows["SDPA kernel PyTorch picks for tah's call"]


def test_decode_tokens_match_transformers(full):
    _, _, report = full
    for shape in ("0.6b", "1.7b"):
        c = next(c for c in report["checks"] if c["id"] == f"decode-{shape}")
        batches = c["figures"]["batches"]
        assert list(batches) == ["1", "16"]
        for B, f in batches.items():
            assert f["identical_rows"] == int(B)  # fp32: the same greedy tokens in every row
            assert f["tah_tokens_per_s"] > 0 and f["hf_tokens_per_s"] > 0
        assert c["rows"][0]["result"].startswith("CPU dry-run: tokens identical in 1 of 1 rows;")
        assert c["rows"][1]["result"].startswith("CPU dry-run: tokens identical in 16 of 16 rows")
        speed = c["figures"]["tah_decode_tokens_per_s"]
        assert list(speed) == ["0.0", "0.1", "0.5"] and all(v > 0 for v in speed.values())


def test_pipeline_wrote_a_tah_checkpoint(full):
    tmp, _, report = full
    c = next(c for c in report["checks"] if c["id"] == "pipeline")
    f = c["figures"]
    assert 0 < f["seconds"] <= c["seconds"] and f["generate_seconds"] is None  # not dry-run
    assert f["policies"] == ["standard", "always", "oracle", "decider"]
    assert set(f["files"]) >= {"config.json", "model.safetensors", "tah_config.json",
                               "decider.safetensors", "lora/adapter_model.safetensors"}
    assert c["rows"][0]["result"].startswith("CPU dry-run: exit 0 in ")
    model = tah.load(tmp / "work" / "pipeline-run" / "tah")  # what train.py wrote loads back
    assert model.decider is not None and model.tah.lora_r == 16
    assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 2


def test_a_check_past_its_time_guard_is_stopped_and_said_so(tmp_path):
    t = time.time()
    p, report = dry_run(tmp_path, "--parts", "attention", "--budget", "10", fault="attention=hang")
    assert time.time() - t < 40  # the hung check did not hold the run
    [hung] = report["checks"]
    assert hung["id"] == "attention" and hung["status"] == "time guard"
    assert hung["seconds"] == pytest.approx(hung["guard_s"], abs=3)  # killed at its guard
    assert "**TIME GUARD**: stopped by its time guard" in hung["rows"][0]["result"]
    assert "stopped by its time guard" in p.stdout


def test_flags_are_checked_where_they_are_parsed(tmp_path, capsys):
    for flags, message in [(["--parts", "nothing"], "'nothing' names no check"),
                           (["--budget", "0"], "0 is not a number > 0"),
                           (["--tokenizer", str(tmp_path)], "no tokenizer.json there")]:
        with pytest.raises(SystemExit) as e:
            realsize.parse_args(flags)
        assert e.value.code == 2 and message in capsys.readouterr().err
    a = realsize.parse_args(["--parts", "decode", "stage1-0.6b", "memory-bf16", "--dry-run"])
    assert a.parts == ["decode", "stage1-0.6b", "memory-bf16"]
    assert str(a.json) == "runs/realsize-dry-run.json" and a.tokenizer == realsize.BPE.resolve()


def test_the_gpu_setting_builds_the_published_shapes(tmp_path):
    """What only a GPU run builds: Qwen3-0.6B and -1.7B (parameters as their model cards give
    them: 0.6B with 0.44B outside the embedding, 1.7B with 1.4B), bf16 on CUDA; the CPU
    rehearsal builds the same, one step per memory run."""
    s = realsize.Setting("gpu", tmp_path, realsize.BPE)
    assert s.device.type == "cuda" and s.dtype == torch.bfloat16 and s.shrink == 1
    cpu = realsize.Setting("cpu", tmp_path, realsize.BPE)
    assert cpu.device.type == "cpu" and cpu.steps == 1 and cpu.config("0.6b") == s.config("0.6b")
    for shape, total, body in [("0.6b", 0.596e9, 0.440e9), ("1.7b", 1.72e9, 1.41e9)]:
        c = s.config(shape)
        assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
                c.vocab_size, c.tie_word_embeddings) == (28, 16, 8, 128, 151936, True)
        with torch.device("meta"):
            n = sum(p.numel() for p in tah.TaH(c).parameters())
        assert n == pytest.approx(total, rel=3e-3)  # to the digits given
        assert n - c.vocab_size * c.hidden_size == pytest.approx(body, rel=3e-3)
