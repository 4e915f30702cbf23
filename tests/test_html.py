"""generate.py --html: the page holds one element per token with the numbers of the trace (one
forward over the prompt and the answer, which equals the streamed decoding: the same passes),
loads nothing from outside, never changes what is generated, and a bad path fails before
generating."""
import json
import math
import os
import re
import subprocess
import sys
from html.parser import HTMLParser

import pytest
import torch
from conftest import FIXTURE, ROOT

import tah

sys.path.insert(0, str(ROOT))
import generate  # noqa: E402
from test_generate import toy_checkpoint, toy_tokenizer  # noqa: E402

TOY_TAH = ROOT / "tests" / "fixtures" / "toy-tah"  # the default toy run, trained
SHOWCASE = "A>C B>J C>A D>E E>D F>G G>F H>I I>H J>B | 1: B J 2: A"  # tutorial chapter 7's figure
PROMPT = "What is 6 times 7?"  # greedy on the fixture: varied tokens, both kinds of passes


class Page(HTMLParser):
    """Collects the token elements (attributes, text, the heading they sit under) and every tag."""

    def __init__(self, text: str):
        super().__init__()
        self.tokens, self.tags, self.heading, self.inside = [], [], None, None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "h2":
            self.heading = ""
        elif tag == "span" and a.get("class", "").split()[:1] == ["t"]:
            self.inside = {**a, "text": "", "section": self.heading}
            self.tokens.append(self.inside)

    def handle_endtag(self, tag):
        if tag == "span":
            self.inside = None

    def handle_data(self, data):
        if self.inside is not None:
            self.inside["text"] += data
        elif self.heading == "" or self.tags and self.tags[-1][0] == "h2":
            self.heading = data


def made_up_trace(T: int) -> dict[str, list]:
    """A trace as generate.trace returns it, for T positions: lists by position."""
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(T, 5, generator=g).sort(-1, descending=True).values
    at = dict(passes=torch.randint(1, 4, (T,), generator=g), prob=torch.rand(T, generator=g),
              pass1_ids=torch.randint(0, 100, (T, 5), generator=g), pass1_probs=probs,
              final_ids=torch.randint(0, 100, (T, 5), generator=g), final_probs=probs / 2,
              soft_ids=torch.randint(0, 100, (T, 5), generator=g), soft_weights=probs / 3)
    at["prob"][1] = float("nan")  # a position without a decider probability
    return {k: v.tolist() for k, v in at.items()}


def spy_on_steps(monkeypatch) -> list[tuple[int, int]]:
    """Records the (token, passes) that tah.generate yields (batch of one)."""
    seen, real = [], tah.generate

    def spy(*args, **kw):
        for t, p in real(*args, **kw):
            seen.append((int(t), int(p)))
            yield t, p
    monkeypatch.setattr(tah, "generate", spy)
    return seen


def test_page_holds_the_trace(tmp_path):
    tok = toy_tokenizer(tmp_path)
    prompt, tokens = tok.encode("A>C B>J C>A | 2: A"), tok.encode("C 1: B")
    at = made_up_trace(len(prompt) + len(tokens))
    generate.write_html(str(tmp_path / "t.html"), tok, prompt, tokens, at, "my <model>", 0.75)
    text = (tmp_path / "t.html").read_text(encoding="utf-8")
    page = Page(text)
    assert [t["text"] for t in page.tokens] == [tok.decode([i]) for i in prompt + tokens]
    assert [t["section"] for t in page.tokens] == ["prompt"] * len(prompt) + ["answer"] * len(tokens)
    assert "data-passes" not in page.tokens[0]  # nothing predicted the first token
    for i, t in enumerate(page.tokens[1:]):  # token i + 1 was predicted by position i
        passes, prob = int(at["passes"][i]), float(at["prob"][i])
        assert int(t["data-passes"]) == passes and f"p{min(passes, 3)}" in t["class"].split()
        assert math.isnan(float(t["data-prob"])) if math.isnan(prob) else \
            abs(float(t["data-prob"]) - prob) < 1e-4
        top = json.loads(t["data-top"])
        for name, (ids, probs) in generate.TOPS.items():
            assert [w for w, _, _ in top[name]] == at[ids][i]
            assert [s for _, s, _ in top[name]] == [tok.decode([w]) for w in at[ids][i]]
            assert [x for _, _, x in top[name]] == pytest.approx(at[probs][i], abs=1e-4)
    bars = [a["style"] for tag, a in page.tags if tag == "b"]
    assert len(bars) == len(page.tokens) - 2  # none for the first token and for the NaN
    assert bars[0] == f"width:{float(at['prob'][0]):.1%}"
    assert ("body", {"style": "--thr:75.0%", "data-threshold": "0.75"}) in page.tags
    assert "my &lt;model&gt;" in text and "A&gt;C" in text  # escaped, so the page stays well-formed
    for outside in ("http", "src=", "<link", "<img", "@import", "url("):  # nothing loads from outside
        assert outside not in text.lower()


def test_bad_html_path_fails_before_loading_or_generating(tmp_path, monkeypatch, capsys):
    def no(*a, **kw):
        raise AssertionError("the model loaded or generation started")
    monkeypatch.setattr(tah, "load", no)
    monkeypatch.setattr(tah, "generate", no)
    bad = tmp_path / "missing" / "t.html"
    assert generate.main(["--model", str(FIXTURE), "--html", str(bad), "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot write --html {bad} (No such file or directory); fix")
    assert err.count("\n") == 1
    assert generate.main(["--model", str(FIXTURE), "--html", str(tmp_path), "hi"]) == 2  # a folder
    assert "cannot write --html" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert generate.main(["--model", str(FIXTURE), "--html", str(tmp_path / "file" / "t.html"),
                          "hi"]) == 2  # under a file
    assert "(Not a directory); fix the path" in capsys.readouterr().err
    assert generate.main(["--model", str(FIXTURE), "--html", str(tmp_path / "t.html")]) == 2
    assert "--html traces one prompt; give a prompt" in capsys.readouterr().err  # not a chat
    new = tmp_path / "new.html"  # writable: tried, and nothing left behind when a later step fails
    assert generate.main(["--model", str(tmp_path / "no-model"), "--html", str(new), "hi"]) == 2
    assert "no such model directory" in capsys.readouterr().err and not new.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_html_in_a_read_only_folder(tmp_path, capsys):
    (tmp_path / "ro").mkdir(mode=0o500)
    assert generate.main(["--model", str(FIXTURE), "--html", str(tmp_path / "ro" / "t.html"), "hi"]) == 2
    assert "Permission denied" in capsys.readouterr().err


def test_page_matches_the_model(tmp_path, capsys):
    """Every number on the page against one parallel forward of the whole text."""
    args = ["--model", str(FIXTURE), "--raw", "--greedy", "--max-new-tokens", "16"]
    assert generate.main(args + ["--html", str(tmp_path / "t.html"), PROMPT]) == 0
    out = capsys.readouterr()
    assert f"wrote {tmp_path / 't.html'}" in out.err
    page = Page((tmp_path / "t.html").read_text(encoding="utf-8"))
    model, tok = tah.load(FIXTURE), tah.load_tokenizer(FIXTURE)
    prompt, tokens = tok.encode(PROMPT), []
    for t, _ in tah.generate(model, prompt, 16, stop_ids=tok.stop_ids):
        if int(t) in tok.stop_ids:
            break
        tokens.append(int(t))
    ids = torch.tensor([prompt + tokens])
    assert len(page.tokens) == ids.shape[1] and out.out == tok.decode(tokens) + "\n"
    with torch.no_grad():
        full = model(ids, "decider")
        z1 = model(ids, "standard").logits
    final, pass1 = full.logits[0].softmax(-1).topk(5), z1[0].softmax(-1).topk(5)
    top_k = z1[0].topk(model.tah.input_topk)  # the soft token mixes these with softmax weights
    want = {"pass1_ids": (pass1.indices, pass1.values), "final_ids": (final.indices, final.values),
            "soft_ids": (top_k.indices[:, :5], top_k.values.softmax(-1)[:, :5])}  # by trace key
    prob = torch.sigmoid(full.continue_logit[0])
    assert 0 < int((full.iter_count == 2).sum()) < ids.shape[1]  # both kinds of token occur
    for i, t in enumerate(page.tokens[1:]):  # token i + 1, predicted by position i
        assert int(t["data-passes"]) == int(full.iter_count[0, i])
        assert float(t["data-prob"]) == pytest.approx(float(prob[i]), abs=2e-4)
        top = json.loads(t["data-top"])
        for name, (key, _) in generate.TOPS.items():
            w, x = want[key]
            assert [r[0] for r in top[name]] == w[i].tolist(), name
            assert [r[2] for r in top[name]] == pytest.approx(x[i].tolist(), abs=2e-4), name


@pytest.mark.parametrize("model, flags, prompt", [
    (FIXTURE, ["--raw", "--greedy", "--max-new-tokens", "16"], PROMPT),
    (FIXTURE, ["--raw", "--seed", "5", "--temperature", "1", "--max-new-tokens", "24"], PROMPT),
    (TOY_TAH, ["--greedy", "--max-new-tokens", "12"], SHOWCASE)])
def test_page_passes_are_the_streamed_passes(model, flags, prompt, tmp_path, monkeypatch, capsys):
    """The page is one forward over the prompt and the answer; the answer's passes on it are the
    passes that cached decoding streamed, token by token."""
    if not model.exists():
        pytest.skip("no trained toy checkpoint in this checkout")
    seen = spy_on_steps(monkeypatch)
    assert generate.main(["--model", str(model), *flags, "--html", str(tmp_path / "t.html"), prompt]) == 0
    tok = tah.load_tokenizer(model)
    answer = [t for t in Page((tmp_path / "t.html").read_text(encoding="utf-8")).tokens
              if t["section"] == "answer"]
    streamed = seen[:len(answer)]
    rest = seen[len(answer):]  # a stop token is streamed, not shown
    assert rest == [] or len(rest) == 1 and rest[0][0] in tok.stop_ids
    assert [t["text"] for t in answer] == [tok.decode([t]) for t, _ in streamed]
    assert [int(t["data-passes"]) for t in answer] == [p for _, p in streamed]
    assert {1, 2} <= {p for _, p in streamed}  # both kinds of token occur


def test_tracing_never_changes_the_tokens(tmp_path, capsys):
    args = ["--model", str(FIXTURE), "--raw", "--seed", "3", "--temperature", "1", "--max-new-tokens",
            "16", PROMPT]
    assert generate.main(args) == 0
    plain = capsys.readouterr().out
    assert generate.main(args + ["--html", str(tmp_path / "t.html")]) == 0
    out = capsys.readouterr()
    assert out.out == plain
    n = int(re.search(r"(\d+) tokens \|", out.err)[1])
    page = Page((tmp_path / "t.html").read_text(encoding="utf-8"))
    assert [t["section"] for t in page.tokens].count("answer") == n > 0


def test_subprocess_toy_tokenizer_page(tmp_path):
    """The command of the tutorial's figure, on a random model with the toy's vocabulary."""
    d = toy_checkpoint(tmp_path)
    r = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--model", str(d), "--greedy",
                        "--max-new-tokens", "1", "--html", str(tmp_path / "t.html"),
                        "A>C B>J C>A D>E E>D F>G G>F H>I I>H J>B | 2: A"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    page = Page((tmp_path / "t.html").read_text(encoding="utf-8"))
    assert [t["section"] for t in page.tokens].count("answer") == 1 and len(page.tokens) == 14


@pytest.mark.skipif(not TOY_TAH.exists(), reason="no trained toy checkpoint in this checkout")
def test_trained_toy_page_shows_what_chapter_7_says(tmp_path):
    """The figure of chapter 7: the 1-hop answer from one pass, the 2-hop answer from two, pass 2
    moving the prediction from the fourth of pass 1's guesses to the right letter."""
    args = ["--model", str(TOY_TAH), "--greedy", "--max-new-tokens", "1", "--html",
            str(tmp_path / "t.html"), SHOWCASE]
    assert generate.main(args) == 0
    *prompt, answer = Page((tmp_path / "t.html").read_text(encoding="utf-8")).tokens
    one_hop = prompt[-3]  # "J" in "1: B J"
    assert one_hop["text"] == "J" and one_hop["data-passes"] == "1"
    assert float(one_hop["data-prob"]) < 0.01
    assert answer["text"] == "A" and answer["data-passes"] == "2"
    assert float(answer["data-prob"]) == pytest.approx(0.94, abs=0.005)  # threshold 0.5
    top = json.loads(answer["data-top"])
    pass1, final = top["pass 1 predicted"], top["final (+ pass 2)"]
    assert [s for _, s, _ in pass1] == ["D", "G", "E", "A", "F"] and pass1[0][2] < 0.38
    assert 0.085 <= pass1[3][2] < 0.095  # the right letter, fourth, at 9%
    assert final[0][1] == "A" and 0.9985 <= final[0][2] < 0.9995  # 99.9%
