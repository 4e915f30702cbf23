"""The tutorial cannot rot: its snippets run, the names it cites exist, its figures are current.

Conventions (also stated at the top of tutorial/README.md):
- every ```python block of a chapter runs, in order, in one fresh namespace per chapter, with the
  repository root on sys.path and as the working directory;
- every ```python block pastes into the plain Python prompt of 3.10-3.12, which reads it line by
  line (an indented block ends at its first empty line; a top-level line right after an indented
  block, with no empty line between, is a SyntaxError);
- an ```output block right after a ```python block is what that block prints, checked exactly,
  and a python block that prints must have one;
- every chapter ends with `## Exercises` whose answers are python blocks, so they run too;
- a backticked dotted name that starts with `tah.` or with a class of tah.py (`TaH.forward`) cites
  tah.py and must resolve: by getattr, as a dataclass field, or as an attribute that the class
  sets on `self` (`TaH.decider`); `train.NAME` must be a top-level name of train.py;
- tutorial/figures/*.svg are exactly what tutorial/figures.py writes (from the trained toy
  checkpoint tests/fixtures/toy-tah).
"""
from __future__ import annotations

import ast
import codeop
import contextlib
import dataclasses
import functools
import importlib.util
import inspect
import io
import re
import sys

import pytest
import torch

from conftest import ROOT

sys.path.insert(0, str(ROOT))
import tah  # noqa: E402

TUTORIAL = ROOT / "tutorial"
TOY = ROOT / "tests" / "fixtures" / "toy-tah"  # the trained toy checkpoint (python train.py, seed 0)
CHAPTERS = sorted(TUTORIAL.glob("[0-9][0-9]-*.md"))
FENCE = re.compile(r"^```([\w-]*)[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)
CITE = re.compile(r"`((?:tah\.)?[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)(?:\(\))?`")


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language, code) of every fenced block, in order."""
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(text)]


def prose(text: str) -> str:
    return FENCE.sub("", text)


@functools.cache
def _class_sets(cls: type, name: str) -> bool:
    """Whether some method of cls (or a base defined in tah.py) assigns self.<name> (also
    annotated, `self.kv: dict = {}`, or as one of several targets)."""
    for klass in cls.__mro__:
        if getattr(klass, "__module__", None) != "tah":
            continue
        if re.search(rf"\bself\.{name}\b\s*(=|[:,][^=\n]*=)(?!=)", inspect.getsource(klass)):
            return True
    return False


def is_citation(name: str) -> bool:
    """Starts with `tah.`, `train.` or a class defined in tah.py; `torch.nn`, `model.decider` and
    file names (`tah.py`) do not."""
    if name.endswith(".py"):
        return False
    first = name.split(".")[0]
    return first in ("tah", "train") or \
        (inspect.isclass(getattr(tah, first, None)) and getattr(tah, first).__module__ == "tah")


@functools.cache
def train_names() -> frozenset[str]:
    """Top-level functions, classes and assignments of train.py, read without importing it."""
    path = ROOT / "train.py"
    if not path.exists():
        return frozenset()
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    return frozenset(names)


def resolve(cited: str) -> str | None:
    """None when the citation `cited` names something of tah.py (or train.py), else why not."""
    parts = cited.split(".")
    if parts[0] == "train":
        return None if len(parts) == 2 and parts[1] in train_names() else \
            f"train.py has no top-level {'.'.join(parts[1:])!r} (cite only train.NAME)"
    parts = parts[1:] if parts[0] == "tah" else parts
    obj, path = tah, "tah"
    for i, part in enumerate(parts):
        if hasattr(obj, part):
            obj, path = getattr(obj, part), f"{path}.{part}"
            continue
        if inspect.isclass(obj) and i == len(parts) - 1 and (
                (dataclasses.is_dataclass(obj) and part in {f.name for f in dataclasses.fields(obj)})
                or _class_sets(obj, part)):
            return None  # a field or an attribute set in __init__: fine as the last part
        return f"{path} has no attribute {part!r}"
    return None


def citations(text: str) -> list[str]:
    return [m.group(1) for m in CITE.finditer(prose(text)) if is_citation(m.group(1))]


def broken_citations(text: str) -> list[str]:
    return [f"`{name}`: {why}" for name in citations(text) if (why := resolve(name))]


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_snippets_run(chapter, monkeypatch):
    """Runs every python block of the chapter in order in one namespace; checks output blocks."""
    monkeypatch.chdir(ROOT)
    monkeypatch.syspath_prepend(str(ROOT))
    namespace = {"__name__": f"tutorial_{chapter.stem.replace('-', '_')}"}
    printed, ran, blocks = None, 0, fenced_blocks(chapter.read_text(encoding="utf-8"))
    for n, (lang, code) in enumerate(blocks):
        if lang == "python":
            buffer = io.StringIO()
            with contextlib.redirect_stdout(buffer):
                try:
                    exec(compile(code, f"{chapter.name} block {n + 1}", "exec"), namespace)
                except Exception as e:
                    raise AssertionError(f"{chapter.name}, python block {n + 1} failed:\n{code}") from e
            printed, ran = buffer.getvalue(), ran + 1
            shown = n + 1 < len(blocks) and blocks[n + 1][0] == "output"
            assert shown or not printed.strip(), \
                f"{chapter.name}, python block {n + 1} prints\n{printed}\nbut no ```output block shows it"
        elif lang == "output":
            assert printed is not None, f"{chapter.name}: an output block must follow a python block"
            got = "\n".join(line.rstrip() for line in printed.rstrip("\n").splitlines())
            want = "\n".join(line.rstrip() for line in code.rstrip("\n").splitlines())
            assert got == want, f"{chapter.name}, output block {n + 1}: printed\n{got}\nbut the text says\n{want}"
            printed = None
    assert ran, f"{chapter.name} has no python snippet"


def paste_errors(code: str) -> list[str]:
    """What the plain Python prompt (3.10-3.12, the `code` module's loop) reports when `code` is
    pasted into it: each line goes into a buffer, which is compiled as one interactive statement;
    a complete statement empties the buffer (it would run), an error is reported and empties it.
    The empty line after the block is the Enter a reader presses after pasting."""
    compiler, buffer, errors = codeop.CommandCompiler(), [], []
    for number, line in enumerate([*code.splitlines(), ""], 1):
        buffer.append(line)
        try:
            complete = compiler("\n".join(buffer), "<stdin>", "single")
        except (SyntaxError, ValueError, OverflowError) as e:
            errors.append(f"line {number}: {type(e).__name__}: {getattr(e, 'msg', e)}")
            buffer = []
            continue
        if complete is not None:
            buffer = []
    if buffer:
        errors.append("the input is still incomplete after an empty line")
    return errors


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_snippets_paste_into_the_plain_prompt(chapter):
    """Pasted line by line, as the Python 3.10-3.12 prompt reads, no block is a SyntaxError."""
    blocks = fenced_blocks(chapter.read_text(encoding="utf-8"))
    bad = [f"python block {n + 1}: {errors}" for n, (lang, code) in enumerate(blocks)
           if lang == "python" and (errors := paste_errors(code))]
    assert not bad, f"{chapter.name}: blocks that the plain prompt refuses (put an empty line " \
        "after each indented block, none inside one):\n" + "\n".join(bad)


def test_paste_check_catches_what_the_plain_prompt_refuses():
    ok = "for i in range(2):\n    x = i\n\ny = (1,\n\n     2)\nprint(x, y)\n"
    assert paste_errors(ok) == []
    assert paste_errors("for i in range(2):\n    x = i\ny = 1\n") == \
        ["line 3: SyntaxError: invalid syntax"]  # a top-level line right after the block
    assert paste_errors("def f():\n    a = 1\n\n    return a\n") == \
        ["line 4: IndentationError: unexpected indent"]  # the empty line ended the body
    assert paste_errors("x = [1,\n") == ["the input is still incomplete after an empty line"]


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_ends_with_exercises_whose_answers_run(chapter):
    """Motivation first (prose before the first snippet), exercises last, with answers in code."""
    text = chapter.read_text(encoding="utf-8")
    first_code = FENCE.search(text)
    assert first_code and len(prose(text[:first_code.start()]).split()) >= 60, \
        f"{chapter.name}: say why (a paragraph or more) before the first snippet"
    assert "\n## Exercises\n" in text, f"{chapter.name} has no '## Exercises' section"
    exercises = text.split("\n## Exercises\n", 1)[1]
    assert "\n## " not in exercises, f"{chapter.name}: '## Exercises' must be the last section"
    assert any(lang == "python" for lang, _ in fenced_blocks(exercises)), \
        f"{chapter.name}: the exercises need answers as python blocks (they run with the chapter)"


def test_missing_printed_output_is_caught(tmp_path, monkeypatch):
    """A snippet that prints with no output block after it fails the check."""
    page = tmp_path / "99-x.md"
    page.write_text("```python\nimport tah\nprint(2 + 2)\n```\n", encoding="utf-8")
    with pytest.raises(AssertionError, match="no ```output block shows it"):
        test_snippets_run(page, monkeypatch)
    page.write_text("```python\nprint(2 + 2)\n```\n\n```output\n5\n```\n", encoding="utf-8")
    with pytest.raises(AssertionError, match="but the text says"):
        test_snippets_run(page, monkeypatch)
    page.write_text("```python\nprint(2 + 2)\n```\n\n```output\n4\n```\n", encoding="utf-8")
    test_snippets_run(page, monkeypatch)


@pytest.mark.parametrize("page", [TUTORIAL / "README.md", *CHAPTERS], ids=lambda p: p.stem)
def test_cited_names_exist(page):
    text = page.read_text(encoding="utf-8")
    assert not broken_citations(text), f"{page.name} cites names that do not exist:\n" + \
        "\n".join(broken_citations(text))
    assert citations(text), f"{page.name} cites nothing of tah.py"


def test_citation_check_catches_made_up_names():
    text = ("`tah.duo_causal_mask`, `TaH.forward`, `tah.KVCache.write`, `TaHConfig.decider_dims`, "
            "`TaH.decider`, `Keys.kv`, `Output.logits`, `torch.nn.Linear`, `model.decider`, `x`\n"
            "```python\n`tah.inside_code_is_not_prose`\n```\n"
            "`train.oracle_labels`, `train.py`, `tah.py`\n"
            "`tah.no_such_function`, `TaH.no_such_method`, `tah.KVCache.nope`, `Decider.forward.x`, "
            "`train.no_such_function`")
    assert broken_citations(text) == [
        "`tah.no_such_function`: tah has no attribute 'no_such_function'",
        "`TaH.no_such_method`: tah.TaH has no attribute 'no_such_method'",
        "`tah.KVCache.nope`: tah.KVCache has no attribute 'nope'",
        "`Decider.forward.x`: tah.Decider.forward has no attribute 'x'",
        "`train.no_such_function`: train.py has no top-level 'no_such_function' (cite only train.NAME)",
    ]


def test_links_resolve():
    """Every relative link and image of the tutorial points at a file that exists, and the index
    links every chapter."""
    index = (TUTORIAL / "README.md").read_text(encoding="utf-8")
    for chapter in CHAPTERS:
        assert f"({chapter.name})" in index, f"tutorial/README.md does not link {chapter.name}"
    for page in [TUTORIAL / "README.md", *CHAPTERS]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", prose(page.read_text(encoding="utf-8"))):
            if "://" not in target:
                assert (page.parent / target).exists(), f"{page.name} links {target}, which does not exist"


def _figures_module():
    spec = importlib.util.spec_from_file_location("tutorial_figures", TUTORIAL / "figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_duo_mask_figure_is_current():
    figures = _figures_module()
    committed = (TUTORIAL / "figures" / "duo_mask.svg").read_bytes()
    assert figures.duo_mask_svg().encode("utf-8") == committed, "run: python tutorial/figures.py"
    entries, states = figures.mask_states()  # the worked example, read off the figure's own grid
    row = states[entries.index((3, 2))]
    assert [e for e, s in zip(entries, row) if s == "attend"] == [(0, 1), (1, 1), (2, 1), (3, 1), (1, 2), (3, 2)]
    row = states[entries.index((4, 1))]
    assert [e for e, s in zip(entries, row) if s == "attend"] == [(p, 1) for p in range(5)]


def test_figures_are_current(tmp_path):
    figures = _figures_module()
    written = figures.write_all(tmp_path, TOY)
    assert sorted(p.name for p in written) == sorted(p.name for p in (TUTORIAL / "figures").glob("*.svg"))
    for path in written:
        committed = TUTORIAL / "figures" / path.name
        assert path.read_bytes() == committed.read_bytes(), f"{committed} is stale: run python tutorial/figures.py"


def test_pipeline_figure_shows_the_shapes_of_a_real_forward():
    figures = _figures_module()
    s = figures.pipeline_shapes(TOY)
    model, tok = tah.load(TOY), tah.load_tokenizer(TOY)
    ids = torch.tensor([tok.encode(figures.typical_row(TOY))])
    with torch.no_grad():
        out = model(ids, "decider")
    n = int((out.iter_count == 2).sum())
    assert 0 < n < ids.shape[1] and s["T_d"] == s["active"] == n  # one row: T_d is its actives
    assert 0.15 < n / ids.shape[1] < 0.35  # typical: about a quarter iterate, as chapter 0 says
    assert s["logits"] == tuple(out.logits.shape) == (1, ids.shape[1], model.config.vocab_size)
    svg = (TUTORIAL / "figures" / "pipeline.svg").read_text(encoding="utf-8")
    for step in ("pass 1", "decider", "hard_first", "soft_token", "pass 2", "add_logit_residual"):
        assert step in svg, f"the pipeline figure lacks the step {step!r}"
    assert f"z2 (B, T_d, V) = (1, {n}, {model.config.vocab_size})" in svg
    assert f"(B, T_d, T + T_d) = (1, {n}, {ids.shape[1] + n})" in svg


def test_token_trace_is_the_trained_toy_and_its_legend_is_what_is_drawn():
    figures = _figures_module()
    tokens = figures.trace(TOY)
    answers = [(label, p, right) for label, p, answer, right in tokens if answer]
    assert len(answers) == 16  # the toy's 16 queries per row
    words = figures.TRACE_ROW.split()
    table = dict(w.split(">") for w in words[:10])
    queries = [(words[11 + 3 * q], words[12 + 3 * q]) for q in range(16)]  # (marker, letter)
    two_hop = [marker == "2:" for marker, _ in queries]
    iterated = [p == 2 for _, p, _ in answers]
    model, tok = tah.load(TOY), tah.load_tokenizer(TOY)
    ids = tok.encode(figures.TRACE_ROW)
    assert ids.index(tok.tok.token_to_id("|")) == 10  # one token per word: answer q is token 13 + 3q
    with torch.no_grad():
        guess = model(torch.tensor([ids]), "standard").logits[0].argmax(-1)  # pass 1 alone
    pass1_right = [int(guess[12 + 3 * q]) == ids[13 + 3 * q] for q in range(16)]
    # what chapter 7 says of it: all sixteen answers are right; the 1-hop answers take one pass and
    # the 2-hop answers that pass 1 gets wrong (2: I, twice, and 2: G) take the second
    assert all(r for *_, r in answers)
    assert iterated == [h and not r for h, r in zip(two_hop, pass1_right)]
    assert [queries[q] for q in range(16) if iterated[q]] == [("2:", "I"), ("2:", "I"), ("2:", "G")]
    # 2-hop answers whose letter maps to itself (2: E, 2: J) take one pass, and so do the first
    # answer, 2: H, and 2: D (H>D and D>H): pass 1 gets them right alone
    for q, (marker, x) in enumerate(queries):
        if marker == "2:" and table[table[x]] == x:
            assert not iterated[q] and pass1_right[q], f"query {q}: 2: {x} should take one pass"
    assert {x for m, x in queries if m == "2:" and table[x] == x} == {"E", "J"}
    assert queries[0] == ("2:", "H") and table[table["H"]] == "H" != table["H"] == "D"
    assert ("2:", "D") in queries
    # and three second passes go to unscored tokens, each predicted at a 2-hop answer token
    unscored = [t for t, (_, p, answer, _) in enumerate(tokens) if p == 2 and not answer]
    assert [tokens[t][0] for t in unscored] == ["2:", "1:", "1:"]
    assert all(tokens[t - 1][2] and words[t - 3] == "2:" for t in unscored)
    svg = (TUTORIAL / "figures" / "token_trace.svg").read_text(encoding="utf-8")
    assert "official-tiny" not in svg and "random" not in svg
    drawn_passes = {p for _, p, _, _ in tokens}
    for p, label in [(1, "1 pass"), (2, "2 passes"), (0, "first token")]:
        assert (label in svg) == (p in drawn_passes), f"legend entry {label!r} vs what is drawn"
    marks = {r for *_, r in answers}
    assert ("right (final argmax)" in svg) == (True in marks)
    assert ("gets wrong" in svg) == (False in marks)
    assert svg.count("✗") == (False in marks) + sum(not r for *_, r in answers)


def test_hard_first_figure_is_what_hard_first_makes():
    figures = _figures_module()
    valid, active, idx, q_valid = figures.hard_first_example()
    assert torch.equal(idx, tah.hard_first(active)[0]) and not (active & ~valid).any()
    for b in range(len(active)):  # each row: its actives first, in order, then fillers
        actives = active[b].nonzero().flatten().tolist()
        assert idx[b, :len(actives)].tolist() == actives and q_valid[b].tolist() == \
            [True] * len(actives) + [False] * (idx.shape[1] - len(actives))
    assert (~q_valid).any() and (~valid.gather(1, idx) & ~q_valid).any()  # a filler is padding
    svg = (TUTORIAL / "figures" / "hard_first.svg").read_text(encoding="utf-8")
    for b in range(len(active)):
        assert " ".join("TF"[not v] for v in q_valid[b].tolist()) in svg


def test_keys_cache_figure_shows_the_real_layout():
    figures = _figures_module()
    keys, mask2 = figures.keys_example(TOY)
    assert sorted(keys.meta) == [1, 2] and sorted(keys.kv) == [(0, 1), (0, 2)]
    assert keys.meta[2][0].tolist() == [[1, 3], [3, 0]] and keys.meta[2][2].tolist() == \
        [[True, True], [True, False]]  # chapter 4's gathered positions; row 1's filler
    assert mask2.shape == (2, 2, 5 + 2)
    cache, reads, end = figures.cache_example(TOY)
    S = cache.max_len
    assert cache.valid[0, :S].tolist() == [True] * end + [False] * (S - end)
    assert cache.valid[0, S:].tolist() == [p == 2 for p in (1, 2, 1, 2)] + [False] * (S - end)
    assert reads == {1: end, 2: S + end}  # the lower depth whole, its own depth up to the newest
    svg = (TUTORIAL / "figures" / "keys_cache.svg").read_text(encoding="utf-8")
    assert f"k[:, :, :{S + end}]" in svg and str(tuple(cache.k[0].shape)) in svg


def test_training_stages_figure_counts_the_toy_parts():
    figures = _figures_module()
    counts = figures.parameter_counts(TOY)
    model = tah.load(TOY)
    assert sum(counts.values()) == sum(p.numel() for p in model.parameters())
    assert counts["lora"] == sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n) > 0
    svg = (TUTORIAL / "figures" / "training_stages.svg").read_text(encoding="utf-8")
    for n in counts.values():
        assert f"({n:,})" in svg
    trains = [{part for part, role in stage["parts"].items() if role == "trains"} for stage in figures.STAGES]
    assert trains == [{"backbone", "lora"}, {"decider"}]  # chapter 6: stage 1, then stage 2
