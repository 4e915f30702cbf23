"""The measurements that left train.py for bench/: bench/seeds.py (train.main once per seed, the
per-seed and mean/range tables) and bench/realsize.py's stored fit of stage 1's peak memory."""
import json
import sys

import pytest
import torch
from conftest import ROOT

import tah
from bench import realsize

sys.path.insert(0, str(ROOT / "bench"))
import seeds  # noqa: E402

TOY = ["--pretrain-steps", "6", "--steps", "6", "--decider-steps", "4", "--batch", "8", "--micro-batch", "4",
       "--eval-samples", "8", "--threads", "1", "--log-every", "2"]


@pytest.fixture(scope="module", autouse=True)
def keep_threads():
    """train.main(--threads 1) sets PyTorch's thread count; the rest of the suite gets its own back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_summary_of_seeds_is_mean_and_range():
    runs = [{"tah": {"decider": {"acc": a, "iterating": i}}} for a, i in [(0.5, 0.1), (0.8, 0.3), (0.9, 0.2)]]
    s = seeds.summarize(runs)["tah"]["decider"]
    assert s["acc"] == pytest.approx([2.2 / 3, 0.5, 0.9]) and s["iterating"] == pytest.approx([0.2, 0.1, 0.3])


def test_seeds_run_each_seed_in_its_folder(tmp_path, capsys):
    summary = seeds.main(TOY + ["--out", str(tmp_path), "--seeds", "3", "4"])
    res = [json.loads((tmp_path / f"seed-{s}" / "eval.json").read_text()) for s in (3, 4)]
    assert res[0] != res[1] and summary == json.loads((tmp_path / "summary.json").read_text())
    for k in ("acc", "acc_hard", "iterating_all"):
        v = [r["tah"]["decider"][k] for r in res]
        assert summary["tah"]["decider"][k] == pytest.approx([sum(v) / 2, min(v), max(v)])
    assert "--seed 3 --out" in (tmp_path / "seed-3" / "train.log").read_text()
    printed = capsys.readouterr().out
    acc, hard = summary["tah"]["decider"]["acc"], [r["tah"]["decider"]["acc_hard"] for r in res]
    assert "\nseeds 3 / 4: mean [min, max]\n" in printed
    assert f"\ntah            decider {acc[0]:8.3f} [{acc[1]:.3f}, {acc[2]:.3f}]" in printed
    per_seed = printed[printed.index("\nseed 3 / 4\n"):printed.index("\nseeds 3 / 4: mean")]
    row = next(line for line in per_seed.splitlines() if line.startswith("tah            decider"))
    assert row.endswith(f"{hard[0]:.3f} / {hard[1]:.3f}")  # the 2-hop column, one value a seed
    # rerun: every seed's run is found finished, and the tables are the same
    assert seeds.main(TOY + ["--out", str(tmp_path), "--seeds", "3", "4"]) == summary
    assert "finished before" in (tmp_path / "seed-4" / "train.log").read_text()


def test_peak_memory_estimate_matches_the_rehearsal():
    """At the true Qwen3-0.6B shape with its published LoRA, the estimator reproduces the peak
    memory that the CPU rehearsal (bench/realsize.py --tokenizer DIR) measured for one stage-1
    step (GiB, resident memory less the 0.59 GiB the process held before the model) within 2%,
    under bf16 autocast at 256-1024 tokens and at 2048, which the fit did not see, and in fp32;
    AdamW's update is a floor."""
    config, parts = tah.Qwen3Config(), tah.TaHConfig(lora_r=16, lora_alpha=32)
    for tokens, measured in [(256, 12.18), (1024, 12.83)]:  # fp32
        gib = realsize.peak_memory_bytes(config, parts, tokens, 1, torch.float32) / 2**30
        assert gib == pytest.approx(measured, rel=0.02), tokens
    for tokens, measured in [(256, 11.70), (512, 11.84), (1024, 12.12), (2048, 12.65)]:  # bf16
        gib = realsize.peak_memory_bytes(config, parts, tokens, 1, torch.bfloat16) / 2**30
        assert gib == pytest.approx(measured, rel=0.02), tokens
    long = realsize.peak_memory_bytes(config, parts, 8192, 1, torch.bfloat16) / 2**30
    assert 15 < long < 17  # the README's "16.0 GiB at 8192 tokens" for 0.6b
    small = tah.Qwen3Config(vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                            num_attention_heads=1, num_key_value_heads=1, head_dim=8)
    n = sum(p.numel() for p in tah.TaH(small, parts).parameters())
    assert realsize.peak_memory_bytes(small, parts, 1, 1, torch.float32) == 20 * n


def test_the_estimate_follows_who_iterates():
    """AlwaysThink's second pass over every token costs more than stage 1's 15%; Standard less."""
    config, parts = tah.Qwen3Config(), tah.TaHConfig(lora_r=16, lora_alpha=32)
    at = {share: realsize.peak_memory_bytes(config, parts, 4096, 1, torch.bfloat16, share)
          for share in (0.0, realsize.HARD_SHARE, 1.0)}
    assert at[0.0] < at[realsize.HARD_SHARE] < at[1.0]
    default = realsize.peak_memory_bytes(config, parts, 4096, 1, torch.bfloat16)
    assert at[realsize.HARD_SHARE] == default


def test_memory_table_is_the_estimate(capsys):
    """`python bench/realsize.py --table`: the README's table, each cell peak_memory_bytes (GiB)."""
    realsize.memory_table()
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[2:]}
    for name, lora in (("0.6b", 16), ("1.7b", 32)):
        config, parts = realsize.SHAPES[name], tah.TaHConfig(lora_r=lora, lora_alpha=2 * lora)
        cells = [f"{realsize.peak_memory_bytes(config, parts, T, 1, torch.bfloat16) / 2**30:.1f}"
                 for T in (4096, 8192, 10000)]
        assert rows[name][-3:] == cells
