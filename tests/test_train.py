"""train.py, CPU and offline: the toy pipeline, the 0.6b code path on local stand-ins, oracle labels,
data selection, the stage-2 loss, pruning, bitwise resume, one-line errors, bad data, NaN and
out-of-memory handling. Runs train.main() in-process with tiny step counts."""
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

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


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("bf16", [False, True])
def test_chunked_loss_equals_the_whole_logits(tie, bf16, monkeypatch):
    """train.lm_loss makes the logits CE_CHUNK positions at a time and again in backward, never
    (B, T, V) at once: its loss and every gradient equal cross-entropy over the whole logits of
    one forward (logits="all"), with a live LoRA, ~40% of the tokens iterating and padding; in
    fp32 to fp32 rounding, under bf16 autocast to bf16 rounding."""
    c = tah.Qwen3Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                        tie_word_embeddings=tie, max_position_embeddings=64)
    torch.manual_seed(0)
    model = tah.TaH(c, tah.TaHConfig(lora_r=4, lora_alpha=8, lora_dropout=0.0, input_topk=5))
    model.init_weights(std=0.2)
    for m in model.modules():  # a live adapter, as after some training
        if isinstance(m, tah.LoRALinear):
            torch.nn.init.normal_(m.lora_B.weight, std=0.2)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, c.vocab_size, (2, 11), generator=g)
    valid = torch.arange(11) < torch.tensor([[11], [8]])  # row 1: 3 pads on the right
    tgt = F.pad(ids[:, 1:], (0, 1), value=-100).masked_fill(~valid | (torch.rand(2, 11, generator=g) < 0.2), -100)
    passes = 1 + (torch.rand(2, 11, generator=g) < 0.4).long()
    b = dict(ids=ids, valid=valid, tgt=tgt, passes=passes)
    monkeypatch.setattr(train, "CE_CHUNK", 4)  # 3 chunks of positions, the last one short
    params = [p for p in model.parameters()]
    with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        ours = train.lm_loss(model, b, "oracle")[0]
        whole = model(ids, passes, valid=valid).logits  # (2, 11, 97)
        ref = F.cross_entropy(whole.float().flatten(0, 1), tgt.flatten(), reduction="sum")
    assert model(ids, passes, valid=valid).iter_count.gt(1).sum() > 4
    g1 = torch.autograd.grad(ours, params, allow_unused=True)
    g2 = torch.autograd.grad(ref, params, allow_unused=True)
    rtol = 3e-2 if bf16 else 1e-5  # bf16 keeps 8 bits: a few roundings apart
    assert abs(ours.item() - ref.item()) <= rtol * abs(ref.item())
    for (name, _), x, y in zip(model.named_parameters(), g1, g2):
        assert (x is None) == (y is None), name
        if x is not None:
            assert (x - y).abs().max() <= rtol * y.abs().max() + 1e-7, name


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
    assert f"labels: {int((labels == 2).sum())} of " in (out / "train.log").read_text() and (labels == 2).any()
    # stage 2 trained the decider alone: backbone and LoRA bitwise those of stage 1
    s1, final = tensors(out / "stage1"), tensors(out / "tah")
    assert same(s1, {k: v for k, v in final.items() if not k.startswith("decider")})
    model = tah.load(out / "tah")
    assert model.decider is not None and model.tah.threshold == 0.5 and model.config.num_hidden_layers == 1
    tok = tah.load_tokenizer(out / "tah")  # what generate.py reads: raw prompts in the toy's words
    assert tok.encode("A>C B>J | 2: A") == [train.PAIR + 2, train.PAIR + 19, train.SEP, train.HOP1 + 1, train.LETTER]
    log = (out / "train.log").read_text()
    assert "tok/s" in log and "ETA" in log and "bitwise unchanged" in log and "2-hop" in log
    assert "grad norm" in log and "stage1: clipped (gradient norm over --clip 1.0) in" in log
    # the closing words: the fixed/broken table, the verdict and a generate.py command that names the model
    assert "fixed 1-hop broken 1-hop" in log and "TaH with its decider gets" in log
    assert f"python generate.py --model {out / 'tah'} --greedy --max-new-tokens 1 '" in log
    assert f"Score it: python bench/eval.py --model {out / 'tah'} --greedy --max-new-tokens 1 " \
        "tests/fixtures/toy-eval.jsonl" in log
    for name, policy in [("tah", "always"), ("tah", "decider"), ("always", "always")]:
        r = res[name][policy]
        assert f"{name:14} {policy:9}" + "".join(f"{r[k]:12d}" for k in ("fixed_easy", "broken_easy",
                                                                         "fixed_hard", "broken_hard")) in log
    assert res["tah"]["standard"]["fixed"] == res["tah"]["standard"]["broken"] == 0  # pass 1 against itself


def test_resume_is_bitwise(toy, tmp_path, monkeypatch, capsys):
    ref, _ = toy
    args = TOY + ["--out", str(tmp_path)]
    # interrupts after Standard step 3, stage-1 step 2, decider step 1 (its dropout masks come from the seed
    # and the step), and after the last decider step (state saved, model not yet); the count is per process
    for stop in (3, 5, 5, 3):
        monkeypatch.setenv("TRAIN_STOP_AFTER", str(stop))
        with pytest.raises(SystemExit) as e:
            train.main(args)
        assert e.value.code == 130
    monkeypatch.delenv("TRAIN_STOP_AFTER")
    assert (tmp_path / "tah.state.pt").exists() and not (tmp_path / "tah").exists()
    train.main(args)
    for name in ("standard", "stage1", "tah", "standard-long", "always"):
        assert same(tensors(ref / name), tensors(tmp_path / name)), name
    assert (ref / "eval.json").read_text() == (tmp_path / "eval.json").read_text()
    log = (tmp_path / "train.log").read_text()
    assert all(f"{s}: resuming at step {k}" in log for s, k in [("standard", "3/6"), ("stage1", "2/6"), ("tah", "1/4"), ("tah", "4/4")])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train.main(args + ["--lr", "0.1"])
    assert e.value.code == 2 and "other settings (lr)" in capsys.readouterr().err


def test_nan_loss_stops_and_keeps_the_last_good_state(tmp_path, monkeypatch):
    calls, ce = [], train.chunked_ce
    monkeypatch.setattr(train, "chunked_ce", lambda *a: ce(*a) * (float("nan") if calls.append(1) or len(calls) > 4 else 1))
    args = TOY + ["--out", str(tmp_path), "--save-every", "1"]
    with pytest.raises(SystemExit) as e:
        train.main(args)  # 2 micro-batches per step: steps 1-2 are fine, step 3 is NaN
    assert e.value.code == 1 and "loss is nan at step 3" in (tmp_path / "train.log").read_text()
    assert int(torch.load(tmp_path / "standard.state.pt", weights_only=True)["step"]) == 2
    monkeypatch.undo()
    monkeypatch.setenv("TRAIN_STOP_AFTER", "1")
    with pytest.raises(SystemExit):
        train.main(args)
    assert "standard: resuming at step 2/6" in (tmp_path / "train.log").read_text()


def test_ctrl_c_finishes_the_step_saves_and_exits(tmp_path, monkeypatch):
    calls, ce = [], train.chunked_ce

    def ce_then_ctrl_c(*a):
        calls.append(1)
        if len(calls) == 3:  # inside step 2 (2 micro-batches per step): the step still completes
            os.kill(os.getpid(), signal.SIGINT)
        return ce(*a)
    monkeypatch.setattr(train, "chunked_ce", ce_then_ctrl_c)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # nohup/`&` ignore SIGINT
    try:
        with pytest.raises(SystemExit) as e:
            train.main(TOY + ["--out", str(tmp_path)])
        assert e.value.code == 130 and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)
    assert int(torch.load(tmp_path / "standard.state.pt", weights_only=True)["step"]) == 2


def test_bad_data_lines_name_file_and_line(tmp_path):
    good = json.dumps({"question": "q", "generation": "<think>\nx\n</think>\n\ny"})
    for bad, why in [("{not json", "JSONDecodeError"), ('{"question": "q"}', "generation"),
                     ('{"messages": [{"role": "user", "content": "q"}]}', "assistant"),
                     (good.replace("y", "\udce9"), "UnicodeDecodeError")]:  # a Latin-1 byte, not UTF-8
        f = tmp_path / "bad.jsonl"
        f.write_bytes(f"{good}\n\n{bad}\n".encode("utf-8", "surrogateescape"))
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
    assert "20 rows kept, 0 of them cut to --max-len 128; 1 dropped; 0 had no think block" in log
    assert "prune: held-out loss" in log and "without layer 0: " in log
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
    assert set(res) == {"tah", "standard"} and list(res["standard"]) == ["standard"]
    assert tah.load(tmp_path / "standard").config.num_hidden_layers == 3
    res = train.main(args + ["--prune", "--baseline", "always"])  # AlwaysThink: every token, a LoRA
    assert set(res) == {"tah", "standard", "always"} and res["always"]["always"]["iterating"] == 1
    assert tah.load(tmp_path / "always").tah.lora_r == 16


def test_long_rows_are_cut_or_dropped_and_counted():
    tok = tah.load_tokenizer(FIXTURE)
    rows = [([{"role": "user", "content": f"q{i}"}], "<think>\nstep\n</think>\n\n" * (i % 2) + "answer " * 40)
            for i in range(6)]  # the even rows have no think block
    rows += [([{"role": "user", "content": "long " * 200}], "<think>\nx\n</think>\n\nx")]  # the prompt fills it
    rows += [([{"role": "user", "content": "q"}], "no think block"), ([{"role": "user", "content": "r"}],
                                                                      "<think>\nok\n</think>\n\nfine")]
    lens = [len(tok.encode(tok.chat(m + [{"role": "assistant", "content": r}], add_generation_prompt=False)))
            for m, r in rows]
    max_len = 60
    assert sum(n > max_len for n in lens) == 7 and max(lens[-2:]) <= max_len
    logs = []
    cut = train.chat_data(iter(rows), tok, max_len, "truncate", SimpleNamespace(log=logs.append))
    assert len(cut["start"]) == 8 and int(cut["offsets"][-1]) == 6 * max_len + lens[-2] + lens[-1]
    assert "8 rows kept, 6 of them cut to --max-len 60; 1 dropped; 4 had no think block" in logs[-1]
    dropped = train.chat_data(iter(rows), tok, max_len, "drop", SimpleNamespace(log=logs.append))
    assert len(dropped["start"]) == 2 and "2 rows kept, 0 of them cut to --max-len 60; 7 dropped" in logs[-1]
    # as Qwen3's template writes it: a response without a think block gets an empty one
    ids = dropped["ids"][int(dropped["start"][0]):int(dropped["offsets"][1])].tolist()
    assert tok.decode(ids) == "<think>\n\n</think>\n\nno think block<|im_end|>\n"


def test_openr1_choice_falls_back_to_llama_and_takes_the_shortest_in_tokens():
    words = lambda texts: [len(t.split()) for t in texts]  # noqa: E731 (a tokenizer: one token a word)
    gens = ["a b c d", "abcdefghijklmnop", "x y"]
    choose = train.choose_generation
    # the shortest by tokens, not by characters: "abcdefghijklmnop" is one token
    assert choose({"generations": gens, "correctness_math_verify": [True, True, False]}, words) == gens[1]
    # none verified by math_verify (all False, None entries, the field None or missing): llama's choice
    for mv in ([False, False, False], [None, None, None], None):
        assert choose({"generations": gens, "correctness_math_verify": mv,
                       "correctness_llama": [True, False, True]}, words) == "x y"
    assert choose({"generations": gens, "correctness_llama": [True, False, False]}, words) == gens[0]
    for bad in ({}, {"generations": None, "correctness_math_verify": None, "correctness_llama": None},
                {"generations": gens, "correctness_math_verify": [False] * 3, "correctness_llama": [None] * 3}):
        assert choose(bad, words) is None
    too_long = {"generations": ["w " * 8192, "w " * 8191], "correctness_math_verify": [True, False]}
    assert choose(too_long, words) is None  # the chosen one has 8192 tokens: the problem is dropped
    too_long["correctness_math_verify"] = [True, True]
    assert choose(too_long, words) == "w " * 8191


def test_decider_loss_weighs_every_row_the_same():
    logit = torch.tensor([[0.0, 2.0, -1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    passes = torch.tensor([[1, 2, 1, 1], [2, 1, 1, 1]])
    valid = torch.tensor([[True, True, True, False], [True, False, False, False]])  # 3 and 1 real tokens
    model = lambda ids, policy, valid, logits: SimpleNamespace(continue_logit=logit)  # noqa: E731
    loss, rows = train.decider_loss(model, dict(ids=passes, passes=passes, valid=valid), pos_weight=2.0)
    sp = lambda x: math.log1p(math.exp(x))  # noqa: E731 softplus: BCE = pos_weight * sp(-z) if hard, sp(z) if not
    row0 = (sp(0.0) + 2 * sp(-2.0) + sp(-1.0)) / 3
    row1 = 2 * sp(-1.0)
    assert rows == 2 and float(loss) == pytest.approx(row0 + row1, rel=1e-6)  # train_step divides by 2 rows
    # a per-token mean would weigh the longer row 3 times as much
    assert float(loss) / rows != pytest.approx((3 * row0 + row1) / 4, rel=1e-3)


def errors(argv, capsys) -> str:
    """train.main(argv) must stop with exit code 2 and one line on stderr starting with `error:`."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_user_mistakes_get_one_line_and_leave_the_run_alone(toy, tiny_qwen, tmp_path, capsys):
    out, _ = toy
    before = {f: f.read_bytes() for f in out.rglob("*") if f.is_file()}
    model = str(tiny_qwen / "qwen")
    real = ["--size", "0.6b", "--model", model, "--reference", model, "--data", str(tiny_qwen / "data.jsonl")]
    no_chat = tmp_path / "no-chat"  # a checkpoint whose tokenizer has no chat tokens: the toy's
    tah.save(tah.load(out / "standard"), no_chat, tokenizer_dir=out / "tokenizer")
    (tmp_path / "file").write_text("x")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    for argv, says in [
        (["--lr", "-1"], "argument --lr: -1 is not a number > 0"),
        (["--batch", "0"], "argument --batch: 0 is not a whole number > 0"),
        (["--threshold", "2"], "argument --threshold: 2 is not a number in [0, 1]"),
        (["--steps", "-3"], "-3 is not a whole number >= 0"), (["--clip", "nan"], "nan is not a number"),
        (["--warmup", "1"], "1 is not a number in [0, 1)"), (["--pos-weight", "inf"], "inf is not a"),
        (["--lora-r", "0"], "argument --lora-r: 0 is not a whole number > 0"),
        (["--lora-dropout", "1"], "argument --lora-dropout: 1 is not a number in [0, 1)"),
        (["--batch", "x"], "argument --batch: invalid int value: 'x'"),
        (["--size", "3b"], "invalid choice: '3b'"), (["--bogus"], "unrecognized arguments: --bogus"),
        (["--device", "cuda:7"], "--device cuda:7: not on this machine"),
        (["--device", "tpu"], "--device tpu: not a device"),
        (["--lr", "0.1"], "other settings (lr)"), (["--baseline"], "the toy trains its baselines anyway"),
        (real + ["--model", "/nonexistent/qwen"], "--model /nonexistent/qwen: not a Qwen3 checkpoint"),
        (real + ["--reference", str(tmp_path)], f"--reference {tmp_path}: not a Qwen3 checkpoint"),
        (real + ["--model", str(no_chat)], "has no <|im_start|>/<|im_end|> tokens"),
        (real + ["--data", str(tmp_path / "none.jsonl")], "no such file"),
        (real + ["--decider-layers", "0", "4"], "--decider-layers [0, 4]: indices must lie in 0..3"),
    ]:
        err = errors(TOY + argv + ["--out", str(out)] if "--out" not in argv else argv, capsys)
        assert says in err, (argv, err)
    assert "not a train.py run" in errors(TOY + ["--out", str(tmp_path / "other")], capsys)
    assert "cannot write there" in errors(TOY + ["--out", str(tmp_path / "file" / "run")], capsys)
    assert "not a train.py run" in errors(TOY + ["--out", str(tmp_path / "file")], capsys)
    assert {f: f.read_bytes() for f in out.rglob("*") if f.is_file()} == before  # nothing touched
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine" and len(list((tmp_path / "other").iterdir())) == 1
    assert tah.load(out / "tah").decider is not None
    # as a user sees it: a subprocess, no traceback
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--size", "0.6b", "--model", "/nonexistent",
                        "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: --model /nonexistent") and "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1 and not (tmp_path / "run").exists()


def test_bad_data_line_is_one_line_error(tiny_qwen, tmp_path, capsys):
    model = str(tiny_qwen / "qwen")
    good = json.dumps({"question": "q", "generation": "<think>\nx\n</think>\n\ny"}).encode()
    for name, text, says in [("bad.jsonl", b'{"question": "q"}\n', ":1: bad line (KeyError: 'generation')"),
                             ("latin1.jsonl", good + b"\n" + good.replace(b"y", b"\xe9") + b"\n",
                              ":2: bad line (UnicodeDecodeError: 'utf-8' codec can't decode byte 0xe9")]:
        (tmp_path / name).write_bytes(text)
        err = errors(["--size", "0.6b", "--model", model, "--reference", model, "--data", str(tmp_path / name),
                      "--decider-layers", "0", "--device", "cpu", "--out", str(tmp_path / "run" / name)], capsys)
        assert f"{tmp_path / name}{says}" in err, err


def test_out_of_memory_ends_in_one_line_and_the_saved_state_resumes(tmp_path, monkeypatch, capsys):
    calls, ce = [], train.chunked_ce

    def ce_then_oom(*a):
        calls.append(1)
        if len(calls) == 5:  # 2 micro-batches per step: step 3's first
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return ce(*a)
    monkeypatch.setattr(train, "chunked_ce", ce_then_oom)
    args = TOY + ["--out", str(tmp_path), "--save-every", "1"]
    err = errors(args, capsys)
    assert err.startswith("error: standard: out of GPU memory in step 3; see the README's memory table") and \
        "--max-len" in err and "--micro-batch 1" in err and "resume from the last saved state" in err
    assert int(torch.load(tmp_path / "standard.state.pt", weights_only=True)["step"]) == 2
    monkeypatch.undo()
    monkeypatch.setenv("TRAIN_STOP_AFTER", "1")
    with pytest.raises(SystemExit) as e:
        train.main(args)
    assert e.value.code == 130 and "standard: resuming at step 2/6" in (tmp_path / "train.log").read_text()
    assert int(torch.load(tmp_path / "standard.state.pt", weights_only=True)["step"]) == 3
