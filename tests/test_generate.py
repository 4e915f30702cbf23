"""generate.py: the streamed text and ids against the authors' fixture and plain Qwen3 decoding,
colours, the chat loop, and the errors a user can run into: one line, exit status 2, before
anything loads. (Accuracy on benchmarks is bench/eval.py's: tests/test_eval.py.)"""
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
    assert "'decider' with a model that has one" in capsys.readouterr().err


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


FLAG_ERRORS = [  # (flags, the start of the message); checked before the (missing) model loads
    (["--temperature", "-1"], "error: argument --temperature: -1 is not a number >= 0; see"),
    (["--temperature", "nan"], "error: argument --temperature: nan is not a number >= 0"),
    (["--top-p", "0"], "error: argument --top-p: 0 is not a mass in (0, 1]; see"),
    (["--top-p", "1.5"], "error: argument --top-p: 1.5 is not a mass"),
    (["--top-k", "-1"], "error: argument --top-k: -1 is not an integer >= 0"),
    (["--top-k", "many"], "error: argument --top-k: many is not an integer >= 0; see"),
    (["--top-k", "2.5"], "error: argument --top-k: 2.5 is not an integer"),
    (["--min-p", "1.5"], "error: argument --min-p: 1.5 is not a probability in [0, 1]"),
    (["--threshold", "1.5"], "error: argument --threshold: 1.5 is not a probability in [0, 1]"),
    (["--threshold", "-0.1"], "error: argument --threshold: -0.1 is not a probability"),
    (["--max-new-tokens", "0"], "error: argument --max-new-tokens: 0 is not an integer >= 1"),
    (["--device", "nonsense"], "error: --device nonsense is not usable here"),
    (["--policy", "sometimes"], "error: argument --policy: invalid choice"),
    (["--eval", "gsm8k.jsonl"], "error: unrecognized arguments: --eval"),  # bench/eval.py now
    (["--no-such-flag"], "error: unrecognized arguments: --no-such-flag; see python generate.py"),
]


@pytest.mark.parametrize("flags, message", FLAG_ERRORS)
def test_bad_flags_fail_in_one_line_before_loading(flags, message, tmp_path, capsys):
    assert generate.main(["--model", str(tmp_path / "not-loaded"), *flags, "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1 and "; " in err, err


def test_flags_at_their_bounds_are_taken():
    a = generate.parse_args(["--temperature", "0", "--top-p", "1", "--top-k", "0", "--min-p", "0",
                             "--threshold", "1", "--max-new-tokens", "1", "hi"])
    assert (a.temperature, a.top_p, a.top_k, a.min_p, a.threshold, a.max_new_tokens) == (0, 1, 0, 0, 1, 1)
    assert type(a.top_k) is int and type(a.top_p) is float
    a = generate.parse_args(["hi"])  # the defaults: published sampling, the checkpoint's threshold
    assert (a.temperature, a.top_p, a.top_k, a.threshold, a.max_new_tokens) == (0.6, 0.95, 20, None, 1024)


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
