"""generate.py --html: the page holds one element per token with the numbers of the trace, loads
nothing from outside, never changes what is generated, and a bad path fails before generating."""
import inspect
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
HAS_TRACE = "trace" in inspect.signature(tah.generate).parameters
needs_trace = pytest.mark.skipif(not HAS_TRACE, reason="tah.generate has no trace= yet")


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


def made_up_trace(prompt_len: int, n: int) -> list[dict]:
    """A trace as tah.generate records it (batch of one): the prompt, then n - 1 fed-back tokens."""
    g = torch.Generator().manual_seed(0)

    def entry(T):
        probs = torch.rand(1, T, 5, generator=g).sort(-1, descending=True).values
        return dict(passes=torch.randint(1, 4, (1, T), generator=g), prob=torch.rand(1, T, generator=g),
                    pass1_ids=torch.randint(0, 100, (1, T, 5), generator=g), pass1_probs=probs,
                    final_ids=torch.randint(0, 100, (1, T, 5), generator=g), final_probs=probs / 2,
                    soft_ids=torch.randint(0, 100, (1, T, 5), generator=g), soft_weights=probs / 3)
    trace = [entry(prompt_len)] + [entry(1) for _ in range(n - 1)]
    trace[0]["prob"][0, 1] = float("nan")  # a position without a decider probability
    return trace


def test_page_holds_the_trace(tmp_path):
    tok = toy_tokenizer(tmp_path)
    prompt, tokens = tok.encode("A>C B>J C>A | 2: A"), tok.encode("C 1: B")
    trace = made_up_trace(len(prompt), len(tokens))
    generate.write_html(str(tmp_path / "t.html"), tok, prompt, tokens, trace, "my <model>", 0.75)
    text = (tmp_path / "t.html").read_text(encoding="utf-8")
    page = Page(text)
    at = {k: torch.cat([e[k] for e in trace], 1)[0] for k in trace[0]}  # position -> numbers
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
            assert [w for w, _, _ in top[name]] == at[ids][i].tolist()
            assert [s for _, s, _ in top[name]] == [tok.decode([w]) for w in at[ids][i].tolist()]
            assert [x for _, _, x in top[name]] == pytest.approx(at[probs][i].tolist(), abs=1e-4)
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
    assert err.startswith(f"error: cannot write --html {bad} (No such file or directory)")
    assert err.count("\n") == 1
    assert generate.main(["--model", str(FIXTURE), "--html", str(tmp_path), "hi"]) == 2  # a folder
    assert "cannot write --html" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert generate.main(["--model", str(FIXTURE), "--html", str(tmp_path / "file" / "t.html"),
                          "hi"]) == 2  # under a file
    assert "(Not a directory); give a writable path" in capsys.readouterr().err
    assert generate.main(["--model", str(FIXTURE), "--html", str(tmp_path / "t.html")]) == 2
    assert "--html traces one prompt" in capsys.readouterr().err  # a chat has no single trace


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_html_in_a_read_only_folder(tmp_path, capsys):
    (tmp_path / "ro").mkdir(mode=0o500)
    assert generate.main(["--model", str(FIXTURE), "--html", str(tmp_path / "ro" / "t.html"), "hi"]) == 2
    assert "Permission denied" in capsys.readouterr().err


@needs_trace
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


@needs_trace
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


@needs_trace
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


@needs_trace
@pytest.mark.skipif(not TOY_TAH.exists(), reason="no trained toy checkpoint in this checkout")
def test_trained_toy_page_shows_what_chapter_7_says(tmp_path):
    """The figure of chapter 7: the 1-hop answer from one pass, the 2-hop answer from two, pass 2
    moving the prediction from a wrong top five to the right letter."""
    args = ["--model", str(TOY_TAH), "--greedy", "--max-new-tokens", "1", "--html",
            str(tmp_path / "t.html"), SHOWCASE]
    assert generate.main(args) == 0
    *prompt, answer = Page((tmp_path / "t.html").read_text(encoding="utf-8")).tokens
    one_hop = prompt[-3]  # "J" in "1: B J"
    assert one_hop["text"] == "J" and one_hop["data-passes"] == "1"
    assert float(one_hop["data-prob"]) < 0.01
    assert answer["text"] == "A" and answer["data-passes"] == "2"
    assert float(answer["data-prob"]) == pytest.approx(0.91, abs=0.005)  # threshold 0.5
    top = json.loads(answer["data-top"])
    pass1, final = top["pass 1 predicted"], top["final (+ pass 2)"]
    assert [s for _, s, _ in pass1] == ["H", "D", "G", "J", "F"] and pass1[0][2] < 0.28
    assert final[0][1] == "A" and final[0][2] > 0.998
