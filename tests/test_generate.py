"""generate.py: the streamed text and ids against the authors' fixture and plain Qwen3 decoding,
colours, the chat loop, --eval (protocol, scorers, the toy set end to end), and the errors a user
can run into: one line, exit status 2, before anything loads."""
import io
import json
import re
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import FIXTURE, ROOT
from safetensors.torch import load_file

import tah

sys.path.insert(0, str(ROOT))
import generate  # noqa: E402
import train  # noqa: E402

PROMPT = "The sum of 3 and 4 is"  # plain text: encodes and decodes back to itself
GREEDY = ["--model", str(FIXTURE), "--raw", "--greedy"]
ANSI = re.compile(r"\033\[[0-9;]*m")
TOY_EVAL = ROOT / "tests" / "fixtures" / "toy-eval.jsonl"
TOY_TAH = ROOT / "tests" / "fixtures" / "toy-tah"  # the default toy run, trained


def toy_tokenizer(folder) -> tah.Tokenizer:
    """The toy's word-level tokenizer (no chat tokens), as train.py writes it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {w: i for i, w in enumerate(train.TOY_VOCAB)}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    words.save(str(folder / "tokenizer.json"))
    return tah.Tokenizer(folder)


def toy_checkpoint(tmp_path):
    """A random TaH (with a decider) over the toy's vocabulary, saved as train.py saves the toy."""
    (tmp_path / "tok").mkdir()
    toy_tokenizer(tmp_path / "tok")
    torch.manual_seed(0)
    config = tah.Qwen3Config(vocab_size=len(train.TOY_VOCAB), hidden_size=32, intermediate_size=64,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             head_dim=8, max_position_embeddings=64)
    tah_config = tah.TaHConfig(lora_r=4, lora_alpha=8, input_topk=5, decider_layers=[0, 1],
                               decider_dims=[16], decider_topk=5)
    tah.save(tah.TaH(config, tah_config), tmp_path / "tah", tokenizer_dir=tmp_path / "tok")
    return tmp_path / "tah"


@pytest.fixture(scope="module")
def fixture_model():
    return tah.load(FIXTURE), tah.load_tokenizer(FIXTURE)


def greedy_kwargs(tok, n, policy="decider"):
    return dict(max_new_tokens=n, policy=policy, stop_ids=tok.stop_ids, threshold=None, generator=None,
                temperature=0.0, top_k=0, top_p=1.0, min_p=0.0)


def reference_tokens(model, tok, ids, n, policy="decider"):
    """Greedy tokens (B=1) straight from tah.generate, cut before the first stop token."""
    out = []
    for t, p in tah.generate(model, ids, n, policy=policy, stop_ids=tok.stop_ids):
        if int(t) in tok.stop_ids:
            break
        out.append((int(t), int(p)))
    return out


def spy_on_prompts(monkeypatch) -> list[list[int]]:
    """Records the prompt ids of every tah.generate call."""
    seen, real = [], tah.generate

    def spy(model, ids, *args, **kw):
        seen.append(list(ids))
        return real(model, ids, *args, **kw)
    monkeypatch.setattr(tah, "generate", spy)
    return seen


def test_stream_reproduces_the_authors_generation(fixture_model, capsys):
    model, tok = fixture_model
    e = load_file(FIXTURE / "expected.safetensors")
    tokens, passes = generate.stream(model, tok, e["gen_prompt_ids"][0].tolist(), greedy_kwargs(tok, 16))
    assert tokens == e["gen_tokens"][0].tolist()
    # token k was predicted by the last prompt position (k = 0) or by generated token k-1
    assert passes == [int(e["gen_prompt_iter_count"][0, -1])] + e["gen_iter_count"][0, :-1].tolist()
    out = capsys.readouterr()
    assert out.out == tok.decode(tokens) + "\n"  # split multi-byte characters printed whole
    assert "16 tokens |" in out.err and f"{sum(p > 1 for p in passes) / 16:.1%} iterated" in out.err


def test_cli_greedy_text_and_colours(fixture_model, capsys):
    model, tok = fixture_model
    assert tok.decode(tok.encode(PROMPT)) == PROMPT
    ref = reference_tokens(model, tok, tok.encode(PROMPT), 20)
    assert 0 < sum(p > 1 for _, p in ref) < len(ref)  # both colours occur
    text = tok.decode([t for t, _ in ref])
    assert generate.main(GREEDY + ["--max-new-tokens", "20", PROMPT]) == 0
    out = capsys.readouterr()
    assert out.out == text + "\n"  # capsys is not a terminal: no colours, no legend
    assert "\033" not in out.out + out.err and "colours" not in out.err
    assert generate.main(GREEDY + ["--max-new-tokens", "20", "--color", "always", PROMPT]) == 0
    out = capsys.readouterr()
    assert all(tok.decode([t]) != "\ufffd" for t, _ in ref)  # so each token prints on its own
    assert out.out == "".join(generate.paint(tok.decode([t]), p, True) for t, p in ref) + "\n"
    assert ANSI.sub("", out.out) == text + "\n" and "colours: 1 pass" in out.err


def test_subprocess_cli_without_terminal(fixture_model):
    model, tok = fixture_model
    text = tok.decode([t for t, _ in reference_tokens(model, tok, tok.encode(PROMPT), 8)])
    r = subprocess.run([sys.executable, str(ROOT / "generate.py"), *GREEDY, "--max-new-tokens", "8", PROMPT],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout == text + "\n" and "\033" not in r.stdout
    assert re.search(r"8 tokens \| [0-9.]+ tokens/s \| [0-9.]+% iterated \(policy decider\)", r.stderr)


def test_plain_qwen3_directory_equals_transformers_greedy(tmp_path, capsys):
    from transformers import Qwen3ForCausalLM
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(FIXTURE / name, tmp_path / name)
    tok = tah.load_tokenizer(tmp_path)
    ids = tok.encode(PROMPT)
    hf = Qwen3ForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        want = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, eos_token_id=tok.stop_ids,
                           pad_token_id=tok.stop_ids[0])[0, len(ids):].tolist()
    want = want[:next((i for i, t in enumerate(want) if t in tok.stop_ids), len(want))]
    assert generate.main(["--model", str(tmp_path), "--raw", "--greedy", "--max-new-tokens", "24", PROMPT]) == 0
    out = capsys.readouterr()
    assert out.out == tok.decode(want) + "\n"
    assert "no decider" in out.err and "0.0% iterated (policy standard)" in out.err
    tokens, passes = generate.stream(tah.load(tmp_path), tok, ids, greedy_kwargs(tok, 24, "standard"))
    assert tokens == want and set(passes) == {1}
    assert generate.main(["--model", str(tmp_path), "--policy", "decider", PROMPT]) == 2
    assert "needs a model with a decider" in capsys.readouterr().err


def test_chat_keeps_history(fixture_model, monkeypatch, capsys):
    seen = spy_on_prompts(monkeypatch)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\nand then?\n"))  # then Ctrl-D
    assert generate.main(["--model", str(FIXTURE), "--greedy", "--max-new-tokens", "6", "--system", "be brief"]) == 0
    out = capsys.readouterr().out
    monkeypatch.setattr(sys, "stdin", io.StringIO("exit\nnot answered\n"))
    assert generate.main(["--model", str(FIXTURE)]) == 0 and len(seen) == 2  # two turns, then 'exit'
    monkeypatch.undo()
    model, tok = fixture_model
    first = tok.decode([t for t, _ in reference_tokens(model, tok, seen[0], 6)])
    turns = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    assert seen[0] == tok.encode(tok.chat(turns))
    turns += [{"role": "assistant", "content": first}, {"role": "user", "content": "and then?"}]
    assert seen[1] == tok.encode(tok.chat(turns))
    assert out.startswith("> " + first + "\n> ")


def test_no_think_system_and_seed(fixture_model, monkeypatch, capsys):
    seen = spy_on_prompts(monkeypatch)
    args = ["--model", str(FIXTURE), "--no-think", "--system", "S", "--seed", "3", "--max-new-tokens", "12", "hi"]
    outs = [(generate.main(args), capsys.readouterr().out) for _ in range(2)]
    assert outs[0] == outs[1] and outs[0][0] == 0  # sampling with a seed repeats itself
    _, tok = fixture_model
    turns = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}]
    assert seen[0] == tok.encode(tok.chat(turns, enable_thinking=False)) == seen[1]
    assert tok.decode(seen[0]).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_tokenizer_without_chat_tokens_gets_the_raw_prompt(tmp_path, capsys):
    shutil.copytree(FIXTURE, tmp_path / "m")
    j = json.loads((tmp_path / "m" / "tokenizer.json").read_text())
    for t in j["added_tokens"]:
        t["content"] = t["content"].replace("im_", "xx_")
    (tmp_path / "m" / "tokenizer.json").write_text(json.dumps(j))
    tok = tah.load_tokenizer(tmp_path / "m")
    assert not tok.has_chat
    text = tok.decode([t for t, _ in reference_tokens(tah.load(tmp_path / "m"), tok, tok.encode(PROMPT), 12)])
    assert generate.main(["--model", str(tmp_path / "m"), "--greedy", "--max-new-tokens", "12", PROMPT]) == 0
    out = capsys.readouterr()
    assert out.out == text + "\n" and "no chat tokens" in out.err


def test_ctrl_c_stops_only_the_answer(fixture_model, monkeypatch, capsys):
    model, tok = fixture_model

    def interrupted(*args, **kw):
        yield torch.tensor([65]), torch.tensor([2])
        yield torch.tensor([66]), torch.tensor([1])
        raise KeyboardInterrupt

    monkeypatch.setattr(tah, "generate", interrupted)
    assert generate.stream(model, tok, [1, 2], greedy_kwargs(tok, 9)) == ([65, 66], [2, 1])
    out = capsys.readouterr()
    assert out.out == tok.decode([65, 66]) + "\n" and "[stopped]" in out.err and "50.0% iterated" in out.err


def test_characters_split_over_tokens_print_whole(fixture_model, monkeypatch, capsys):
    model, tok = fixture_model
    text = "h\u00e9llo w\u00f6rld \u20ac 10 \u00b0C"
    ids = tok.encode(text)
    assert "\ufffd" in "".join(tok.decode([i]) for i in ids)  # some characters span several tokens
    monkeypatch.setattr(tah, "generate", lambda *a, **kw: ((torch.tensor([i]), torch.tensor([1 + k % 2]))
                                                           for k, i in enumerate(ids)))
    assert generate.stream(model, tok, [1], greedy_kwargs(tok, 99), color=True)[0] == ids
    out = capsys.readouterr().out
    assert ANSI.sub("", out) == text + "\n" and "\ufffd" not in out


def test_word_level_tokenizer_keeps_its_spaces(tmp_path, fixture_model, monkeypatch, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers
    words = Tokenizer(models.WordLevel({"<unk>": 0, "A": 1, ">": 2, "C": 3}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # like the toy model that train.py writes
    words.save(str(tmp_path / "tokenizer.json"))
    tok = tah.Tokenizer(tmp_path)
    monkeypatch.setattr(tah, "generate", lambda *a, **kw: ((torch.tensor([i]), torch.tensor([1])) for i in [1, 2, 3]))
    assert generate.stream(fixture_model[0], tok, [1], greedy_kwargs(tok, 9))[0] == [1, 2, 3]
    assert capsys.readouterr().out == "A > C\n"


def test_user_errors_are_one_clean_line(tmp_path, capsys):
    assert generate.main(["--model", str(tmp_path / "missing"), "hi"]) == 2
    err = capsys.readouterr().err
    assert "no such model directory" in err and "Traceback" not in err
    shutil.copytree(FIXTURE, tmp_path / "short")
    config = json.loads((tmp_path / "short" / "config.json").read_text())
    (tmp_path / "short" / "config.json").write_text(json.dumps(config | {"max_position_embeddings": 8}))
    assert generate.main(["--model", str(tmp_path / "short"), "--raw", PROMPT]) == 2
    assert "the prompt has 10 tokens but the model's context is 8" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "1+1?", "answer": "2"}\n\n{"question": "oops"\n')
    assert generate.main(["--model", str(FIXTURE), "--eval", str(bad)]) == 2
    assert f"{bad}:3: expected a JSON object" in capsys.readouterr().err
    bad.write_text('{"question": "1+1?", "answer": "2"}\n{"q": "2+2?", "answer": "4"}\n')
    assert generate.main(["--model", str(FIXTURE), "--eval", str(bad)]) == 2
    assert f"{bad}:2:" in capsys.readouterr().err


FLAG_ERRORS = [  # (flags, the start of the message); checked before the (missing) model loads
    (["--temperature", "-1"], "error: --temperature is -1.0; give 0 or more"),
    (["--temperature", "nan"], "error: --temperature is nan"),
    (["--top-p", "0"], "error: --top-p is 0.0; give a mass in (0, 1]"),
    (["--top-p", "1.5"], "error: --top-p is 1.5"),
    (["--top-k", "-1"], "error: --top-k is -1"),
    (["--min-p", "1"], "error: --min-p is 1.0"),
    (["--threshold", "1.5"], "error: --threshold is 1.5; give a probability in [0, 1]"),
    (["--threshold", "-0.1"], "error: --threshold is -0.1"),
    (["--max-new-tokens", "0"], "error: --max-new-tokens is 0; give 1 or more"),
    (["--batch-size", "0"], "error: --batch-size is 0; give 1 or more"),
    (["--eval", "missing.jsonl"], "error: no file missing.jsonl; check --eval"),
    (["--device", "nonsense"], "error: --device nonsense is not usable here"),
    (["--top-k", "many"], "error: argument --top-k: invalid int value: 'many'; see"),
    (["--policy", "sometimes"], "error: argument --policy: invalid choice"),
    (["--no-such-flag"], "error: unrecognized arguments: --no-such-flag; see"),
]


@pytest.mark.parametrize("flags, message", FLAG_ERRORS)
def test_bad_flags_fail_in_one_line_before_loading(flags, message, tmp_path, capsys):
    assert generate.main(["--model", str(tmp_path / "not-loaded"), *flags, "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1 and "; " in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_missing_gpu_is_one_line_in_a_subprocess(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--model", str(FIXTURE),
                        "--device", "cuda", "hi"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("error: --device cuda is not usable here (")
    assert "leave --device out" in r.stderr and "Traceback" not in r.stderr


def test_a_bug_keeps_its_traceback(monkeypatch):
    def broken(*a, **kw):
        raise RuntimeError("a bug")
    monkeypatch.setattr(tah, "load", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        generate.main(["--model", str(FIXTURE), "hi"])


SCORED = [  # (prediction, reference, right): what both scorers must agree on
    ("42", "42", True), ("$42$.", " 42", True), ("42.0", "42", True), ("1,234", "1234", True),
    ("\\text{B}", "B", True), ("\\dfrac{1}{2}", "\\frac{1}{2}", True), ("10\\!000", "10000", True),
    ("-3", "-3", True), ("-3", "3", False), ("3.", "3", True), ("1,2", "12", False),
    ("41", "42", False), ("x+1", "x + 1", True), ("\\frac{1}{\\sqrt{2}}", "\\frac{1}{\\sqrt{2}}", True),
    ("C", "C", True), ("C", "D", False), (None, "42", False)]


@pytest.mark.parametrize("pred, answer, right", SCORED)
def test_exact_match(pred, answer, right):
    assert generate.is_correct(pred, answer) is right


@pytest.mark.parametrize("pred, answer, right", SCORED + [("0.5", "\\frac{1}{2}", True),
                                                          ("\\$5", "5", True)])
def test_math_verify(pred, answer, right, monkeypatch):
    pytest.importorskip("math_verify")
    name, judge = generate.scorer()
    assert name == "math-verify" and bool(judge(pred, answer)) is right


def test_without_math_verify_the_exact_match_runs(monkeypatch):
    monkeypatch.setitem(sys.modules, "math_verify", None)  # import fails, as if not installed
    assert generate.scorer() == ("exact-match", generate.is_correct)


def test_answer_extraction_and_gsm8k_answers(tmp_path):
    assert generate.last_boxed("so \\boxed{1} or rather \\boxed{\\frac{3}{4}} done") == "\\frac{3}{4}"
    assert generate.last_boxed("no box here") is None and generate.last_boxed("\\boxed{unclosed") is None
    assert generate.extract("x \\boxed{\\frac{1}{\\sqrt{2}}}.") == "\\frac{1}{\\sqrt{2}}"  # nested
    assert generate.extract("C 1: D") == "C" and generate.extract(" ") is None  # the toy's replies
    f = tmp_path / "q.jsonl"
    f.write_text('{"question": "a", "answer": "4 + 3 = 7\\n#### 7"}\n{"question": "b", "answer": 12}\n')
    assert generate.read_jsonl(str(f)) == [("a", "7"), ("b", "12")]


RESULT = re.compile(r"(?P<file>\S+): accuracy (?P<right>\d+)/(?P<n>\d+) = [0-9.]+% \| (?P<tokens>\d+) "
                    r"tokens \| [0-9.]+ tokens/s \| (?P<share>[0-9.]+)% iterated \(policy (?P<policy>\w+)\)"
                    r" \| scorer (?P<scorer>[\w-]+) \| threshold (?P<threshold>[0-9.]+) \| "
                    r"max (?P<max>\d+) new tokens\n")


def test_eval_protocol(tmp_path, fixture_model, monkeypatch, capsys):
    f = tmp_path / "q.jsonl"
    f.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n"
                         for q, a in [("What is 6*7?", "#### 42"), ("1+1", "41"), ("Half of 84?", "42.0")]))
    seen = spy_on_prompts(monkeypatch)
    args = ["--model", str(FIXTURE), "--greedy", "--max-new-tokens", "6", "--eval", str(f)]
    assert generate.main(args) == 0  # the random fixture model never writes \boxed{}
    one = capsys.readouterr()
    m = RESULT.fullmatch(one.out)
    assert m and m["right"] == "0" and m["n"] == "3" and m["tokens"] == "18" and m["max"] == "6"
    assert m["threshold"] == "0.9" and m["policy"] == "decider" and f"note: scoring with {m['scorer']}" in one.err
    _, tok = fixture_model
    bare = tok.encode(tok.chat([{"role": "user", "content": "What is 6*7?"}]))
    assert [r.tolist() for r in seen[0]] == [bare]  # the authors' protocol: the bare question in the chat format
    assert generate.main(args + ["--batch-size", "2", "--instruction", "--threshold", "0.5"]) == 0
    m2 = RESULT.fullmatch(capsys.readouterr().out)
    assert m2["threshold"] == "0.5" and float(m2["share"]) > float(m["share"])  # more iterate
    asked = tok.encode(tok.chat([{"role": "user", "content": f"What is 6*7?\n{generate.INSTRUCTION}"}]))
    assert seen[-2][0][-len(asked):].tolist() == asked  # left-padded in a batch of two

    def answers_42(model, ids, valid=None, **kw):  # every row writes \boxed{42}, then stops
        for t in tok.encode("\\boxed{42}") + [tok.stop_ids[-1]]:
            yield torch.full((ids.shape[0],), t), torch.tensor([1, 2] * ids.shape[0])[:ids.shape[0]]

    monkeypatch.setattr(tah, "generate", answers_42)
    assert generate.main(args + ["--batch-size", "2"]) == 0
    out = capsys.readouterr()
    m = RESULT.fullmatch(out.out)
    assert (m["right"], m["tokens"], m["share"]) == ("2", "30", "33.3")
    assert "[2/3] accuracy 1/2 = 50.0%" in out.err


def test_eval_default_length_is_the_papers(monkeypatch, capsys):
    lengths = []
    monkeypatch.setattr(tah, "generate", lambda model, ids, **kw: lengths.append(kw["max_new_tokens"])
                        or iter([(torch.zeros(ids.shape[0], dtype=torch.long),) * 2]))
    assert generate.main(["--model", str(FIXTURE), "--eval", str(TOY_EVAL), "--batch-size", "40"]) == 0
    assert lengths == [4096] and "max 4096 new tokens" in capsys.readouterr().out


def test_toy_eval_set_is_right():
    """Each held-out row's answer follows from its own table (1-hop: table[x]; 2-hop: twice)."""
    rows = generate.read_jsonl(str(TOY_EVAL))
    assert len(rows) == 40 and sum(q.split()[-2] == "2:" for q, _ in rows) == 20
    for q, answer in rows:
        pairs, (hop, x) = q.split(" | ")[0].split(), q.split(" | ")[1].split()
        table = dict(p.split(">") for p in pairs)
        assert sorted(table) == sorted(table.values()) == list("ABCDEFGHIJ")
        assert answer == (table[table[x]] if hop == "2:" else table[x])


def test_toy_eval_end_to_end(tmp_path, capsys):
    """The README's toy command on a random toy checkpoint: the score is the first word's."""
    d = toy_checkpoint(tmp_path)
    args = ["--model", str(d), "--eval", str(TOY_EVAL), "--greedy", "--max-new-tokens", "2",
            "--threshold", "0.5"]
    assert generate.main(args) == 0
    out = capsys.readouterr()
    m = RESULT.fullmatch(out.out)
    assert "no chat tokens" in out.err and m and m["n"] == "40" and m["tokens"] == "80"
    model, tok = tah.load(d), tah.load_tokenizer(d)
    right, passes = 0, []
    for q, answer in generate.read_jsonl(str(TOY_EVAL)):
        steps = list(tah.generate(model, tok.encode(q), 2, threshold=0.5))
        right += tok.decode([int(steps[0][0])]) == answer
        passes += [int(p) for _, p in steps]
    assert 0 < right < 40 and int(m["right"]) == right
    assert float(m["share"]) == pytest.approx(100 * sum(p > 1 for p in passes) / 80, abs=0.05)
    assert generate.main(args + ["--batch-size", "8"]) == 0  # batches score the same
    assert RESULT.fullmatch(capsys.readouterr().out)["right"] == str(right)


@pytest.mark.skipif(not TOY_TAH.exists(), reason="no trained toy checkpoint in this checkout")
def test_trained_toy_on_the_held_out_set(capsys):
    """The README's results line for the toy (a batch of 8 equals one at a time: no padding)."""
    assert generate.main(["--model", str(TOY_TAH), "--eval", str(TOY_EVAL), "--greedy",
                          "--max-new-tokens", "1", "--batch-size", "8"]) == 0
    m = RESULT.fullmatch(capsys.readouterr().out)
    assert (m["right"], m["n"], m["share"], m["threshold"]) == ("37", "40", "35.0", "0.9")
