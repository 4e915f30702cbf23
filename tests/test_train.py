"""train.py, CPU and offline: the toy pipeline, the 0.6b code path on local stand-ins, oracle labels,
pruning, bitwise resume, bad data and NaN handling. Runs train.main() in-process with tiny step counts."""
import contextlib
import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import FIXTURE, ROOT
from safetensors.torch import load_file

import tah

sys.path.insert(0, str(ROOT))
import train  # noqa: E402

TOY = ["--pretrain-steps", "6", "--steps", "6", "--decider-steps", "4", "--batch", "8", "--micro-batch", "4",
       "--eval-samples", "32", "--threads", "1", "--log-every", "2"]


def tensors(d: Path) -> dict:
    """Every tensor of a checkpoint directory, by file and name."""
    return {f"{f.relative_to(d)}:{k}": v for f in sorted(d.rglob("*.safetensors")) for k, v in load_file(f).items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module", autouse=True)
def keep_threads():
    """train.main(--threads 1) sets PyTorch's thread count; the rest of the suite gets its own back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    return out, train.main(TOY + ["--out", str(out)])


def test_oracle_labels_by_hand():
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    pred = torch.tensor([[6, 0, 8, 1, 3]])  # right at t=0 and t=2, wrong at t=1 and t=3; t=4 has no next token
    cand = torch.tensor([[True, True, True, False, True]])
    assert train.oracle_labels(pred, ids, cand).tolist() == [[1, 2, 1, 1, 1]]
    assert train.oracle_labels(pred, ids, torch.ones_like(cand)).tolist() == [[1, 2, 1, 2, 1]]


def test_chunked_ce_matches_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(2, 7, 11, requires_grad=True)
    tgt = torch.randint(0, 11, (2, 7)).masked_fill(torch.rand(2, 7) < 0.3, -100)
    ours = train.chunked_ce(logits, tgt, chunk=3)
    ref = F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), ignore_index=-100, reduction="sum")
    (g1,), (g2,) = torch.autograd.grad(ours, logits), torch.autograd.grad(ref, logits)
    assert torch.allclose(ours, ref) and torch.allclose(g1, g2)


def test_batch_indices_depend_on_seed_and_step_only():
    n, batch = 10, 4  # 5 steps = 2 epochs: each epoch is a permutation of the 10 rows
    steps = [train.batch_indices(3, s, n, batch) for s in range(5)]
    assert torch.equal(torch.cat(steps)[:10].sort().values, torch.arange(10))
    assert torch.equal(torch.cat(steps)[10:].sort().values, torch.arange(10))
    assert torch.equal(train.batch_indices(3, 2, n, batch), steps[2])
    assert not torch.equal(train.batch_indices(4, 2, n, batch), steps[2])


def test_toy_data_is_the_lookup_task():
    d = train.toy_data(5, 1, seed=0)
    ids, target = d["ids"].view(5, -1).long(), d["target"].view(5, -1)
    for row, tg in zip(ids, target):
        table = {int(p - train.PAIR) // 10: int(p - train.PAIR) % 10 for p in row[:train.N_LETTERS]}
        assert sorted(table.values()) == list(range(10))  # a permutation
        for q in range(train.N_QUERIES):
            marker, x, ans = (int(v) for v in row[11 + 3 * q:14 + 3 * q])
            x, ans = x - train.LETTER, ans - train.LETTER
            assert ans == (table[table[x]] if marker == train.HOP1 + 1 else table[x])
            assert int(tg[13 + 3 * q]) == marker - train.HOP1 + 1
    assert int((target == 2).sum()) == 5 * train.N_QUERIES // 2 and int((target > 0).sum()) == 5 * train.N_QUERIES


def test_toy_pipeline(toy):
    out, res = toy
    assert set(res) == {"standard", "standard-long", "always", "tah"} and list(res["tah"]) == train.POLICIES
    assert res == json.loads((out / "eval.json").read_text())
    assert res["tah"]["standard"]["iterating"] == 0 and res["tah"]["always"]["iterating"] == 1
    # the oracle iterates exactly where the stored labels say, at held-out answer-predicting positions
    data, labels = load_file(out / "data.safetensors"), load_file(out / "labels.safetensors")["labels"]
    held = data["held"][:32]
    rows = torch.stack([torch.arange(int(data["offsets"][j]), int(data["offsets"][j + 1])) for j in held])
    pred_pos = F.pad(data["target"][rows][:, 1:], (0, 1)) > 0
    assert res["tah"]["oracle"]["iterating"] == pytest.approx(float((labels[rows] == 2)[pred_pos].float().mean()), abs=1e-4)
    assert not ((labels == 2) & ~F.pad(data["target"][1:] > 0, (0, 1))).any()  # only there
    # stage 2 trained the decider alone: backbone and LoRA bitwise those of stage 1
    s1, final = tensors(out / "stage1"), tensors(out / "tah")
    assert same(s1, {k: v for k, v in final.items() if not k.startswith("decider")})
    model = tah.load(out / "tah")
    assert model.decider is not None and model.tah.threshold == 0.5 and model.config.num_hidden_layers == 1
    tok = tah.load_tokenizer(out / "tah")  # what generate.py reads: raw prompts in the toy's words
    assert tok.encode("A>C B>J | 2: A") == [train.PAIR + 2, train.PAIR + 19, train.SEP, train.HOP1 + 1, train.LETTER]
    log = (out / "train.log").read_text()
    assert "tok/s" in log and "ETA" in log and "bitwise unchanged" in log and "2-hop" in log


def test_resume_is_bitwise(toy, tmp_path):
    ref, _ = toy
    args = TOY + ["--out", str(tmp_path)]
    # interrupts after Standard step 3, stage-1 step 2, decider step 1 (its dropout masks come from the seed
    # and the step), and after the last decider step (state saved, model not yet); --stop-after counts per process
    for stop in (3, 5, 5, 3):
        with pytest.raises(SystemExit) as e:
            train.main(args + ["--stop-after", str(stop)])
        assert e.value.code == 130
    assert (tmp_path / "tah.state.pt").exists() and not (tmp_path / "tah").exists()
    train.main(args)
    for name in ("standard", "stage1", "tah", "standard-long", "always"):
        assert same(tensors(ref / name), tensors(tmp_path / name)), name
    assert (ref / "eval.json").read_text() == (tmp_path / "eval.json").read_text()
    log = (tmp_path / "train.log").read_text()
    assert all(f"{s}: resuming at step {k}" in log for s, k in [("standard", "3/6"), ("stage1", "2/6"), ("tah", "1/4"), ("tah", "4/4")])
    with pytest.raises(SystemExit, match="other settings"):
        train.main(args + ["--lr", "0.1"])


def test_nan_loss_stops_and_keeps_the_last_good_state(tmp_path, monkeypatch):
    calls, ce = [], train.chunked_ce
    monkeypatch.setattr(train, "chunked_ce", lambda *a: ce(*a) * (float("nan") if calls.append(1) or len(calls) > 4 else 1))
    args = TOY + ["--out", str(tmp_path), "--save-every", "1"]
    with pytest.raises(SystemExit) as e:
        train.main(args)  # 2 micro-batches per step: steps 1-2 are fine, step 3 is NaN
    assert e.value.code == 1 and "loss is nan at step 3" in (tmp_path / "train.log").read_text()
    assert int(torch.load(tmp_path / "standard.state.pt", weights_only=True)["step"]) == 2
    monkeypatch.undo()
    with pytest.raises(SystemExit):
        train.main(args + ["--stop-after", "1"])
    assert "standard: resuming at step 2/6" in (tmp_path / "train.log").read_text()


def test_ctrl_c_finishes_the_step_saves_and_exits(tmp_path, monkeypatch):
    calls, ce = [], train.chunked_ce

    def ce_then_ctrl_c(*a):
        calls.append(1)
        if len(calls) == 3:  # inside step 2 (2 micro-batches per step): the step still completes
            os.kill(os.getpid(), signal.SIGINT)
        return ce(*a)
    monkeypatch.setattr(train, "chunked_ce", ce_then_ctrl_c)
    with pytest.raises(SystemExit) as e:
        train.main(TOY + ["--out", str(tmp_path)])
    assert e.value.code == 130 and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert int(torch.load(tmp_path / "standard.state.pt", weights_only=True)["step"]) == 2


def test_bad_data_lines_name_file_and_line(tmp_path):
    good = json.dumps({"question": "q", "generation": "<think>\nx\n</think>\n\ny"})
    for bad, why in [("{not json", "JSONDecodeError"), ('{"question": "q"}', "generation"),
                     ('{"messages": [{"role": "user", "content": "q"}]}', "assistant")]:
        f = tmp_path / "bad.jsonl"
        f.write_text(f"{good}\n\n{bad}\n")
        with pytest.raises(ValueError, match=f"bad.jsonl:3: .*{why}"):
            list(train.read_jsonl(str(f)))


def test_prune_picks_the_layer_that_does_nothing():
    cfg = tah.Qwen3Config(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                          num_key_value_heads=1, head_dim=16, tie_word_embeddings=False)
    torch.manual_seed(0)
    m = tah.TaH(cfg).eval()
    with torch.no_grad():
        m.lm_head.weight *= 30  # sharp predictions, so leaving out a working layer costs a lot
        for layer in m.model.layers:
            layer.self_attn.o_proj.weight *= 10
            layer.mlp.down_proj.weight *= 10
        m.model.layers[1].self_attn.o_proj.weight.zero_()  # layer 1 adds nothing to the residual stream
        m.model.layers[1].mlp.down_proj.weight.zero_()
        ids = torch.randint(0, 50, (4, 16))
        b = dict(ids=ids, valid=torch.ones_like(ids, dtype=torch.bool), tgt=m(ids, "standard").logits.argmax(-1))
    layer, base, losses = train.prune_choice(m, [b], contextlib.nullcontext)
    assert layer == 1 and losses[1] == pytest.approx(base, abs=1e-6) and min(losses[0], losses[2]) > base + 1
    assert m.config.num_hidden_layers == 3 and len(m.model.layers) == 3  # the model is given back whole


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory):
    """A tiny random Qwen3 with the fixture's tokenizer (Qwen3's special tokens) and a small chat JSONL."""
    d = tmp_path_factory.mktemp("tiny")
    cfg = tah.Qwen3Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                          num_key_value_heads=1, head_dim=16, max_position_embeddings=512, torch_dtype="float32")
    torch.manual_seed(0)
    tah.save(tah.TaH(cfg), d / "qwen", tokenizer_dir=FIXTURE)
    lines = [{"question": f"What is {i} + {i + 2}?", "generation": f"<think>\n{i} plus {i + 2} is {2 * i + 2}.\n</think>\n\n"
              f"The answer is {2 * i + 2}."} for i in range(18)]
    lines += [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."},
                            {"role": "assistant", "content": "<think>\nok\n</think>\n\nhi"}]}] * 2
    lines += [{"question": "long " * 400, "generation": "<think>\nx\n</think>\n\nx"}]  # over --max-len: dropped
    (d / "data.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return d


def test_real_size_path_on_local_stand_ins(tiny_qwen, tmp_path):
    model = str(tiny_qwen / "qwen")
    args = ["--size", "0.6b", "--model", model, "--reference", model, "--data", str(tiny_qwen / "data.jsonl"),
            "--max-len", "128", "--device", "cpu", "--dtype", "float32", "--steps", "2", "--decider-steps", "2",
            "--batch", "4", "--micro-batch", "2", "--decider-layers", "0", "2", "--out", str(tmp_path), "--threads", "1"]
    res = train.main(args + ["--prune"])
    assert list(res["tah"]) == train.POLICIES and res["tah"]["always"]["iterating"] == 1
    log = (tmp_path / "train.log").read_text()
    assert "20 examples kept, 1 dropped" in log and "tok/s on the longest rows" in log
    removed = json.loads((tmp_path / "prune.json").read_text())["removed"]
    assert removed in (0, 1, 2) and tah.load(tmp_path / "tah").config.num_hidden_layers == 2
    # data: Qwen3's chat format, the response from <think> to <|im_end|>\n is the scored part
    data, labels = load_file(tmp_path / "data.safetensors"), load_file(tmp_path / "labels.safetensors")["labels"]
    tok, ref = tah.load_tokenizer(model), tah.load(model)
    for j in range(len(data["start"])):
        a, e, s = int(data["offsets"][j]), int(data["offsets"][j + 1]), int(data["start"][j])
        ids = data["ids"][a:e].long()
        assert tok.decode(ids[:s].tolist()).startswith("<|im_start|>") and int(ids[s]) == tok.think
        assert tok.decode(ids[s:].tolist()).endswith("<|im_end|>\n") and data["target"][a:e].tolist() == [0] * s + [1] * (e - a - s)
        # labels: 2 exactly where the reference's greedy guess at t (from <think> on) misses token t+1
        pred = ref(ids[None], "standard").logits[0].argmax(-1)
        hard = [s <= t < e - a - 1 and int(pred[t]) != int(ids[t + 1]) for t in range(e - a)]
        assert labels[a:e].tolist() == [2 if h else 1 for h in hard]
    res = train.main(args + ["--prune", "--baseline"])  # the Standard model on the same data, beside TaH
    assert set(res) == {"tah", "baseline"} and list(res["baseline"]) == ["standard"]
    assert tah.load(tmp_path / "baseline").config.num_hidden_layers == 3
