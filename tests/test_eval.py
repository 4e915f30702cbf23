"""bench/eval.py, offline: the benchmarks' sources, configs and fields, stand-ins of two benchmarks
in their downloaded layout answered by the trained toy, one config of two read alone, --limit,
resuming (after a rerun, a Ctrl-C and a cut-off line), refused settings, the averaged table against
an independent count, the paper's numbers by model size, the offline error, the protocol, answer
extraction and both scorers."""
import importlib.util
import json
import re
import shutil
import subprocess
import sys

import huggingface_hub.constants
import pytest
import torch
from conftest import FIXTURE, ROOT

import tah

sys.path.insert(0, str(ROOT))
import generate  # noqa: E402

spec = importlib.util.spec_from_file_location("bench_eval", ROOT / "bench" / "eval.py")
ev = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ev)

TOY_TAH = ROOT / "tests" / "fixtures" / "toy-tah"  # the default toy run, trained
TOY_EVAL = ROOT / "tests" / "fixtures" / "toy-eval.jsonl"
STAND_INS = ROOT / "tests" / "fixtures" / "benchmarks"  # math500/ (JSONL), amc23/ (parquet)
TOY = ["--model", str(TOY_TAH), "--greedy", "--max-new-tokens", "1"]
GENERATE = tah.generate  # as it is, whatever a test spies on
ROW = re.compile(r"(?P<name>\S+) +(?P<n>\d+) +(?P<acc>[\d.]+)% +(?P<tokens>[\d.]+) +(?P<share>[\d.]+)%")


def table(out: str) -> dict[str, tuple]:
    """The result table's rows: name -> (problems, accuracy %, mean tokens, iterated %)."""
    rows = {m["name"]: (int(m["n"]), float(m["acc"]), float(m["tokens"]), float(m["share"]))
            for m in map(ROW.fullmatch, out.splitlines()) if m}
    assert rows, out
    return rows


def count_answers(monkeypatch) -> list[int]:
    """Counts the rows of every tah.generate call (the answers generated)."""
    rows, real = [], tah.generate

    def spy(model, ids, *args, **kw):
        rows.append(ids.shape[0] if ids.dim() == 2 else 1)
        return real(model, ids, *args, **kw)
    monkeypatch.setattr(tah, "generate", spy)
    return rows


def toy_replies(questions: list[str], threshold: float = 0.9) -> list[tuple[str, int]]:
    """The trained toy's greedy one-token reply and its passes, straight from tah.generate."""
    model, tok = tah.load(TOY_TAH), tah.load_tokenizer(TOY_TAH)
    out = []
    for q in questions:
        (t, p), = GENERATE(model, tok.encode(q), 1, threshold=threshold)
        out.append((tok.decode([int(t)]), int(p)))
    return out


def test_benchmarks_are_the_authors():
    """Sources, splits and fields of the authors' dataset_configs.json; kinds of their grader."""
    want = {"gsm8k": ("pss0204/gsm8k_test", "test", ("problem",), "answer", "expr"),
            "math500": ("HuggingFaceH4/MATH-500", "test", ("problem",), "answer", "latex"),
            "amc23": ("math-ai/amc23", "test", ("question",), "answer", "latex"),
            "aime24": ("Maxwell-Jia/AIME_2024", "train", ("Problem",), "Answer", "expr"),
            "aime25": ("yentinglin/aime_2025", "train", ("problem",), "answer", "expr"),
            "olympiadbench": ("realtreetune/olympiadbench", "test", ("problem",), "answer", "latex")}
    assert {n: tuple(vars(b).values())[:5] for n, b in ev.BENCHMARKS.items()} == want
    configs = {n: b.config for n, b in ev.BENCHMARKS.items()}  # load_dataset(repo, config)
    assert configs == dict.fromkeys(want, "default") | {"gsm8k": "gsm8k_test"}
    assert [s.name for s in ev.sources("paper")] == ["gsm8k", "math500", "amc23", "aime25", "olympiadbench"]


def write_parquet(path, rows: list[dict]):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def write_rows(path, rows: list[dict]):
    """A data file as the hub has it: parquet, or JSONL."""
    if path.suffix == ".parquet":
        return write_parquet(path, rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_each_benchmark_reads_its_fields_in_its_layout(tmp_path):
    """Every benchmark from a folder laid out as the hub has it (other splits, configs and formats
    beside it), by its real field names; only the split's rows, the default config's, in order."""
    def rows(q, a, n=3, tag=""):
        return [{q: f"{tag}question {i}", a: f"{tag}{i}", "extra": "x"} for i in range(n)]
    layouts = {  # benchmark -> {file: rows}; the right ones are untagged
        "gsm8k": {"gsm8k_test/test-00000-of-00001.parquet": [
                      {"id": i, "problem": f"question {i}", "answer": f"so {i} #### {i}"} for i in range(3)],
                  "gsm8k_test/train-00000-of-00001.parquet": rows("problem", "answer", tag="x")},
        "math500": {"test.jsonl": rows("problem", "answer"),
                    ".cache/huggingface/download/test.jsonl": rows("problem", "answer", tag="x")},
        "amc23": {"test-00000-of-00001.parquet": rows("question", "answer")},
        "aime24": {"aime_2024_problems.parquet": rows("Problem", "Answer")},
        "aime25": {"data/train-00000-of-00001.parquet": rows("problem", "answer"),
                   "part1/train-00000-of-00001.parquet": rows("problem", "answer", tag="x")},
        "olympiadbench": {"data/test-00000-of-00001.parquet": rows("problem", "answer"),
                          "data/test.jsonl": rows("problem", "answer", tag="x")},
    }
    for name, files in layouts.items():
        folder = tmp_path / name
        for rel, content in files.items():
            write_rows(folder / rel, content)
        [src] = ev.sources(f"{name}={folder}")
        assert src.path == folder and src.bench is ev.BENCHMARKS[name]
        assert ev.problems(src) == [(f"question {i}", f"{i}") for i in range(3)], name
    (tmp_path / "amc23" / "test-00000-of-00001.parquet").unlink()
    write_parquet(tmp_path / "amc23" / "test-00000-of-00001.parquet", rows("problem", "answer"))
    with pytest.raises(ValueError, match=r"amc23/test-00000-of-00001.parquet:1: expected rows with "
                                         r"question and answer \(KeyError: 'question'\)"):
        ev.problems(ev.sources(f"amc23={tmp_path / 'amc23'}")[0])  # a field of another benchmark
    with pytest.raises(ValueError, match="has no data files of math500's 'test' split.*MATH-500"):
        ev.problems(ev.sources(f"math500={tmp_path / 'aime24'}")[0])


CONFIGS = {  # (benchmark, layout): {file: config}; of two configs, the test split of the first
    ("gsm8k", "folders"): {"gsm8k_test/test-00000-of-00001.parquet": "ours",
                           "gsm8k_test/train-00000-of-00001.parquet": "our train split",
                           "socratic/test-00000-of-00001.parquet": "the other config"},
    ("gsm8k", "data/ folders"): {"data/gsm8k_test/test.jsonl": "ours",
                                 "data/socratic/test.jsonl": "the other config"},
    ("gsm8k", "prefixes"): {"gsm8k_test-test.jsonl": "ours", "socratic-test.jsonl": "the other",
                            "gsm8k_test-train.jsonl": "our train split"},  # _test- is no split
    ("gsm8k", "one config"): {"data/test-00000-of-00001.parquet": "ours",
                              "data/train-00000-of-00001.parquet": "our train split"},
    ("math500", "parquet conversion"): {"default/test/0000.parquet": "ours",
                                        "extra/test/0000.parquet": "the other config"},
}


@pytest.mark.parametrize("name, layout", CONFIGS)
def test_a_config_is_read_alone(name, layout, tmp_path):
    """A dataset of two configs, laid out as the hub has them (a folder or a file name's prefix
    each): only the benchmark's config's test rows are read; a dataset of one config, whole."""
    for rel, config in CONFIGS[name, layout].items():
        write_rows(tmp_path / rel, [{"problem": f"{config} {i}?", "answer": i} for i in (0, 1)])
    [src] = ev.sources(f"{name}={tmp_path}")
    assert ev.problems(src) == [("ours 0?", "0"), ("ours 1?", "1")]


def test_files_take_question_or_problem_and_gsm8k_answers(tmp_path):
    f = tmp_path / "q.jsonl"
    f.write_text('{"question": "a", "answer": "4 + 3 = 7\\n#### 7"}\n\n{"problem": "b", "answer": 12}\n')
    [src] = ev.sources(str(f))
    assert src.name == "q" and src.bench is ev.FILE and ev.problems(src) == [("a", "7"), ("b", "12")]
    write_parquet(tmp_path / "p.parquet", [{"problem": "c", "answer": 3.5}])
    assert ev.problems(ev.sources(str(tmp_path / "p.parquet"))[0]) == [("c", "3.5")]


BAD_FILES = [  # (content, the message); every one is one line naming the file
    ('{"question": "1+1?", "answer": "2"}\n\n{"question": "oops"\n', "q.jsonl:3: expected rows with"),
    ('{"question": "1+1?", "answer": "2"}\n{"q": "2+2?", "answer": "4"}\n', "q.jsonl:2: expected rows"),
    ('[1, 2]', "q.jsonl:1: expected rows with question or problem and answer (TypeError"),
    ("\n\n", "q.jsonl holds no problems"),
    (b"\xff\xfe{", "q.jsonl:1: expected rows with question or problem and answer (UnicodeDecodeError"),
]


@pytest.mark.parametrize("content, message", BAD_FILES)
def test_bad_files_are_one_line_before_loading(content, message, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tah, "load", lambda *a, **kw: pytest.fail("the model loaded"))
    f = tmp_path / "q.jsonl"
    f.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert ev.main(["--model", str(TOY_TAH), str(f)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path}/{message}") and err.count("\n") == 1, err


def test_parquet_without_pyarrow_says_what_to_install(tmp_path, monkeypatch):
    write_parquet(tmp_path / "p.parquet", [{"problem": "c", "answer": "3"}])
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # import fails, as if not installed
    with pytest.raises(ValueError, match=r"p.parquet is parquet, which needs pyarrow: pip install"):
        ev.problems(ev.sources(str(tmp_path / "p.parquet"))[0])


FLAG_ERRORS = [  # (arguments, the start of the message): before anything loads
    (["nope"], "error: argument NAME: nope is neither a benchmark (gsm8k, math500, amc23, aime24, "
               "aime25, olympiadbench, paper) nor a .jsonl or .parquet file; see python bench/eval.py"),
    (["math500=/no/such/folder"], "error: argument NAME: math500=/no/such/folder is no folder"),
    ([str(TOY_EVAL), "--limit", "0"], "error: argument --limit: 0 is not an integer >= 1"),
    ([str(TOY_EVAL), "--batch-size", "0"], "error: argument --batch-size: 0 is not an integer >= 1"),
    ([str(TOY_EVAL), "--threshold", "2"], "error: argument --threshold: 2 is not a probability"),
    ([str(TOY_EVAL), "--top-p", "0"], "error: argument --top-p: 0 is not a mass in (0, 1]"),
    ([], "error: the following arguments are required: NAME; see python bench/eval.py --help"),
    ([str(TOY_EVAL), "--out", str(TOY_EVAL)],
     f"error: argument --out: {TOY_EVAL} is a file; --out is the folder of the results files"),
]


@pytest.mark.parametrize("args, message", FLAG_ERRORS)
def test_bad_flags_fail_in_one_line(args, message, monkeypatch, capsys):
    monkeypatch.setattr(tah, "load", lambda *a, **kw: pytest.fail("the model loaded"))
    assert ev.main(["--model", str(TOY_TAH), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err


def test_defaults_are_the_authors_protocol():
    a = ev.parse_args([str(TOY_EVAL)])
    assert (a.threshold, a.max_new_tokens, a.temperature, a.top_p, a.top_k, a.min_p) == (0.9, 4096, 0.6, 0.95, 20, 0)
    assert (a.instruction, a.limit, a.batch_size, a.greedy) == (None, None, 1, False)


def test_offline_is_one_line_naming_the_dataset(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # nothing cached
    monkeypatch.setattr(tah, "load", lambda *a, **kw: pytest.fail("the model loaded"))
    assert ev.main(["--model", str(TOY_TAH), f"math500={STAND_INS / 'math500'}", "amc23"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: could not download amc23 (math-ai/amc23: ")
    assert "`hf download math-ai/amc23 --repo-type dataset --local-dir DIR`" in err
    assert err.rstrip().endswith("give amc23=DIR")


def test_stand_ins_score_as_the_toy_answers(tmp_path, capsys):
    """Both stand-ins and the toy's held-out FILE: every number of the table against the replies
    of tah.generate itself, and the average row the mean of the others."""
    data = {"math500": [json.loads(x) for x in (STAND_INS / "math500" / "test.jsonl").read_text().splitlines()],
            "toy-eval": [json.loads(x) for x in TOY_EVAL.read_text().splitlines()]}
    pq = pytest.importorskip("pyarrow.parquet")
    data["amc23"] = [{"problem": r["question"], "answer": r["answer"]}
                     for r in pq.read_table(STAND_INS / "amc23" / "test-00000-of-00001.parquet").to_pylist()]
    args = [f"math500={STAND_INS / 'math500'}", f"amc23={STAND_INS / 'amc23'}", str(TOY_EVAL)]
    assert ev.main(TOY + ["--batch-size", "4", "--out", str(tmp_path), *args]) == 0
    out = capsys.readouterr()
    rows = table(out.out)
    assert list(rows) == ["math500", "amc23", "toy-eval", "average"]
    assert "[amc23] 8/8 | accuracy" in out.err and "ETA" in out.err and "tokens/s" in out.err
    for name, problems in data.items():
        replies = toy_replies([r.get("problem") or r["question"] for r in problems])
        right = sum(reply == r["answer"] for (reply, _), r in zip(replies, problems))
        share = sum(p > 1 for _, p in replies) / len(problems)  # one token each
        assert rows[name] == pytest.approx((len(problems), round(100 * right / len(problems), 1), 1.0,
                                            round(100 * share, 1)), abs=0.051)
    mean = [sum(rows[n][k] for n in data) / 3 for k in (1, 2, 3)]
    assert rows["average"] == pytest.approx((8 + 8 + 40, *mean), abs=0.051)
    assert "paper, arXiv v1" not in out.out  # the toy is no size the paper reports
    assert re.search(r"^model \S+toy-tah \| policy decider \| threshold 0.9 \| greedy \| max 1 new "
                     r"tokens \| scorer (math-verify|exact-match)$", out.out, re.M)


def test_limit_and_resume(tmp_path, monkeypatch, capsys):
    """--limit 3, then --limit 6: the second run answers only the 3 new problems, the table counts
    6; the same command again answers nothing and prints the same table."""
    answered = count_answers(monkeypatch)
    args = TOY + ["--out", str(tmp_path), f"math500={STAND_INS / 'math500'}"]
    assert ev.main(args + ["--limit", "3"]) == 0
    assert sum(answered) == 3 and table(capsys.readouterr().out)["math500"][0] == 3
    assert ev.main(args + ["--limit", "6"]) == 0
    first = capsys.readouterr().out
    assert sum(answered) == 6 and table(first)["math500"][0] == 6
    assert ev.main(args + ["--limit", "6"]) == 0
    again = capsys.readouterr()
    assert sum(answered) == 6 and again.out == first and "6/6 already in" in again.err
    [path] = tmp_path.iterdir()
    assert path.name.endswith("toy-tah--math500.jsonl")
    settings, *rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert settings["settings"]["threshold"] == 0.9 and sorted(r["id"] for r in rows) == list(range(6))
    problems = [json.loads(x) for x in (STAND_INS / "math500" / "test.jsonl").read_text().splitlines()]
    replies = toy_replies([p["problem"] for p in problems[:6]])
    for r, p, (reply, passes) in zip(sorted(rows, key=lambda r: r["id"]), problems, replies):
        assert (r["question"], r["reference"], r["reply"], r["answer"]) == (p["problem"], p["answer"], reply, reply)
        assert (r["correct"], r["tokens"], r["iterated"], r["share_iterated"]) == \
            (reply == p["answer"], 1, int(passes > 1), float(passes > 1))
    assert ev.main(args + ["--limit", "2"]) == 0  # a smaller limit counts only its problems
    out = capsys.readouterr()
    assert table(out.out)["math500"][0] == 2 and sum(answered) == 6 and "2/2 already in" in out.err


def test_interrupted_runs_resume_without_duplicates(tmp_path, monkeypatch, capsys):
    """A Ctrl-C after two answers keeps them; a line cut off by a kill is dropped and redone."""
    args = TOY + ["--out", str(tmp_path), f"math500={STAND_INS / 'math500'}"]
    real, calls = tah.generate, []

    def stopped_at_the_third(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **kw)
    monkeypatch.setattr(tah, "generate", stopped_at_the_third)
    assert ev.main(args) == 130
    assert "Ctrl-C stops; the same command goes on where it stopped" in capsys.readouterr().err
    [path] = tmp_path.iterdir()
    assert len(path.read_text().splitlines()) == 1 + 2
    with path.open("a") as f:  # a kill in the middle of writing the third row
        f.write('{"id": 2, "question": "A>')
    monkeypatch.undo()
    answered = count_answers(monkeypatch)
    assert ev.main(args) == 0
    out = capsys.readouterr()
    assert "cut off a partial last line" in out.err and sum(answered) == 6
    rows = [json.loads(x) for x in path.read_text().splitlines()[1:]]  # every line whole
    assert sorted(r["id"] for r in rows) == list(range(8)) and table(out.out)["math500"][0] == 8
    fresh = tmp_path / "fresh"
    assert ev.main(TOY + ["--out", str(fresh), f"math500={STAND_INS / 'math500'}"]) == 0
    assert table(capsys.readouterr().out) == table(out.out)  # the same as one uninterrupted run


@pytest.mark.parametrize("flags, what", [
    (["--threshold", "0.5"], "threshold 0.9 there, 0.5 now"),
    (["--max-new-tokens", "2"], "max_new_tokens 1 there, 2 now"),
    (["--temperature", "1", "--seed", "0"], "seed None there, 0 now; temperature 0.0 there, 1.0 now"),
    (["--policy", "always"], "policy 'decider' there, 'always' now"),
    (["--instruction"], "instruction None there, 'Please reason step by step"),
])
def test_changed_settings_are_refused(flags, what, tmp_path, capsys):
    base = ["--model", str(TOY_TAH), "--max-new-tokens", "1", "--out", str(tmp_path), str(TOY_EVAL), "--limit", "2"]
    assert ev.main(base + ["--greedy"]) == 0
    [path] = tmp_path.iterdir()
    before = path.read_text()
    capsys.readouterr()
    assert ev.main(base + (flags if "--temperature" in flags else ["--greedy", *flags])) == 2
    *notes, err = capsys.readouterr().err.splitlines()  # notes on the model and the scorer
    assert err.startswith(f"error: {path} holds results of other settings (") and what in err, err
    assert all(n.startswith("note: ") for n in notes) and path.read_text() == before  # not mixed


def test_another_model_gets_its_own_file(tmp_path, capsys):
    shutil.copytree(TOY_TAH, tmp_path / "copy")
    for model in (TOY_TAH, tmp_path / "copy"):
        assert ev.main(["--model", str(model), "--greedy", "--max-new-tokens", "1", "--out",
                        str(tmp_path / "out"), str(TOY_EVAL), "--limit", "2"]) == 0
    assert len(list((tmp_path / "out").iterdir())) == 2
    (tmp_path / "out" / "x--y.jsonl").write_text("not json\n")
    with pytest.raises(ValueError, match="x--y.jsonl is not a results file of bench/eval.py"):
        ev.read_results(tmp_path / "out" / "x--y.jsonl", {})


def test_paper_numbers_by_model_size():
    sizes = {(1024, 28): "0.6B", (1024, 27): "0.6B", (2048, 28): "1.7B", (2048, 27): "1.7B"}
    assert ev.SIZES == sizes  # Qwen3-0.6B and -1.7B; 27 layers once TaH pruned one
    rows = [("gsm8k", 10, 0.5, 100.0, 0.1), ("math500", 30, 0.25, 300.0, 0.2)]
    text = ev.table(rows, "0.6B")
    assert table(text)["average"] == (40, 37.5, 200.0, 15.0)
    assert "paper, arXiv v1, Qwen3-0.6B (average of gsm8k, math500, amc23, aime25, olympiadbench" in text
    assert "Standard 31.2 | AlwaysThink 23.9 | TaH 35.2 | TaH+ 36.5" in text
    assert "Standard 47.8 | AlwaysThink 44.7 | TaH 52.8 | TaH+ 53.2" in ev.table(rows, "1.7B")
    assert "arXiv v2 reports nine benchmarks" in text and "arXiv" not in ev.table(rows, None)


def test_the_prompt_is_the_bare_question(tmp_path, monkeypatch, capsys):
    """The authors' protocol on a model with chat tokens: the bare question in the chat format;
    --instruction appends one; a batch is left-padded."""
    f = tmp_path / "q.jsonl"
    f.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n"
                         for q, a in [("What is 6*7?", "#### 42"), ("1+1", "41"), ("Half of 84?", "42.0")]))
    seen, real = [], tah.generate

    def spy(model, ids, *args, **kw):
        seen.append((ids, kw))
        return real(model, ids, *args, **kw)
    monkeypatch.setattr(tah, "generate", spy)
    tok = tah.load_tokenizer(FIXTURE)
    assert ev.main(["--model", str(FIXTURE), "--greedy", "--max-new-tokens", "3", "--out", str(tmp_path), str(f)]) == 0
    bare = tok.encode(tok.chat([{"role": "user", "content": "What is 6*7?"}]))
    assert seen[0][0].tolist() == [bare] and seen[0][1]["threshold"] == 0.9 and seen[0][1]["max_new_tokens"] == 3
    assert ev.main(["--model", str(FIXTURE), "--greedy", "--max-new-tokens", "3", "--out", str(tmp_path / "i"),
                    "--instruction", "--batch-size", "2", str(f)]) == 0
    asked = tok.encode(tok.chat([{"role": "user", "content": f"What is 6*7?\n{ev.INSTRUCTION}"}]))
    ids, kw = seen[-2]
    assert ids.shape[0] == 2 and ids[0][-len(asked):].tolist() == asked
    assert kw["valid"][0].tolist() == [False] * (ids.shape[1] - len(asked)) + [True] * len(asked)
    table(capsys.readouterr().out)


def test_replies_are_scored_as_they_stop(tmp_path, monkeypatch, capsys):
    """Rows stop at their own stop token (not kept) or at the length cap, and are scored by their
    last \\boxed{}; tokens and passes are those of each row."""
    tok = tah.load_tokenizer(FIXTURE)
    box, stop = tok.encode("\\boxed{42}"), tok.stop_ids[-1]

    def scripted(model, ids, valid=None, **kw):  # row 0 boxes 42 and stops; row 1 runs on
        steps = [(t, 2) for t in box] + [(stop, 1)] + [(tok.encode(" so")[0], 1)] * 3
        for k, (t, p) in enumerate(steps):
            yield torch.tensor([t, tok.encode(" x")[0]]), torch.tensor([p if t != stop else 1, 1])
    monkeypatch.setattr(tah, "generate", scripted)
    f = tmp_path / "q.jsonl"
    f.write_text('{"question": "a", "answer": "42"}\n{"question": "b", "answer": "42"}\n')
    assert ev.main(["--model", str(FIXTURE), "--out", str(tmp_path), "--batch-size", "2", str(f)]) == 0
    [path] = [p for p in tmp_path.iterdir() if p.suffix == ".jsonl" and p != f]
    rows = {r["id"]: r for r in map(json.loads, path.read_text().splitlines()[1:])}
    assert (rows[0]["reply"], rows[0]["answer"], rows[0]["correct"]) == ("\\boxed{42}", "42", True)
    assert (rows[0]["tokens"], rows[0]["iterated"]) == (len(box), len(box))
    assert rows[1]["tokens"] == len(box) + 4 and rows[1]["iterated"] == 0 and not rows[1]["correct"]
    assert table(capsys.readouterr().out)["q"][:2] == (2, 50.0)


@pytest.mark.skipif(not TOY_TAH.exists(), reason="no trained toy checkpoint in this checkout")
def test_trained_toy_on_the_held_out_set(tmp_path, capsys):
    """The README's results for the toy (a batch of 8 equals one at a time: no padding)."""
    assert ev.main(TOY + ["--batch-size", "8", "--out", str(tmp_path), str(TOY_EVAL)]) == 0
    assert table(capsys.readouterr().out)["toy-eval"] == (40, 92.5, 1.0, 27.5)


def test_toy_eval_set_is_right():
    """Each held-out row's answer follows from its own table (1-hop: table[x]; 2-hop: twice)."""
    rows = ev.problems(ev.sources(str(TOY_EVAL))[0])
    assert len(rows) == 40 and sum(q.split()[-2] == "2:" for q, _ in rows) == 20
    for q, answer in rows:
        pairs, (hop, x) = q.split(" | ")[0].split(), q.split(" | ")[1].split()
        table = dict(p.split(">") for p in pairs)
        assert sorted(table) == sorted(table.values()) == list("ABCDEFGHIJ")
        assert answer == (table[table[x]] if hop == "2:" else table[x])


def test_answer_extraction():
    assert ev.last_boxed("so \\boxed{1} or rather \\boxed{\\frac{3}{4}} done") == "\\frac{3}{4}"
    assert ev.last_boxed("no box here") is None and ev.last_boxed("\\boxed{unclosed") is None
    assert ev.extract("x \\boxed{\\frac{1}{\\sqrt{2}}}.") == "\\frac{1}{\\sqrt{2}}"  # nested
    assert ev.extract("<think>\n7\n</think>\n\nIt is \\boxed{7}.") == "7"
    assert ev.extract("\\boxed{}") == "" and ev.extract("C 1: D") == "C"  # the toy's replies
    assert ev.extract(" ") is None and ev.extract("") is None


SCORED = {  # kind -> (prediction, reference, exact match, math-verify): a dozen formats each
    "expr": [("42", "42", True, True), ("42.0", "42", True, True), ("$42$", "42", True, True),
             ("42.", "42", True, True), ("1,234", "1234", True, True), ("1234", "1,234", True, True),
             ("\\text{42}", "42", True, True), ("041", "41", True, True),
             ("\\frac{84}{2}", "42", False, True), ("\\$18", "18", False, True),
             ("25\\%", "25", False, True), ("x = 70", "70", False, True), ("-3", "3", False, False),
             ("41", "42", False, False), (None, "42", False, False)],
    "latex": [("\\dfrac{1}{2}", "\\frac{1}{2}", True, True), ("0.5", "\\frac{1}{2}", False, True),
              ("\\dfrac12", "\\frac{1}{2}", False, True), ("0.75", "\\frac{3}{4}", False, True),
              ("(3,\\frac{\\pi}{2})", "\\left( 3, \\frac{\\pi}{2} \\right)", False, True),
              ("10 \\sqrt 2", "10\\sqrt{2}", False, True), ("C", "\\text{(C)}", False, True),
              ("x^2+2x+1", "(x+1)^2", False, True), ("30", "30^\\circ", False, True),
              ("\\{2,1\\}", "\\{1,2\\}", False, True), ("27", "27.0", True, True),
              ("x + 1", "x+1", True, True), ("\\text{B}", "B", True, True), ("F", "F", True, True),
              ("G", "F", False, False), ("[1,2]", "[1,2)", False, False), ("1,2", "12", False, False)],
}
CASES = [(kind, *case) for kind, cases in SCORED.items() for case in cases]


@pytest.mark.parametrize("kind, pred, reference, exact, verified", CASES)
def test_exact_match(kind, pred, reference, exact, verified):
    assert ev.exact_match(pred, reference, kind) is exact


@pytest.mark.parametrize("kind, pred, reference, exact, verified", CASES)
def test_math_verify(kind, pred, reference, exact, verified):
    pytest.importorskip("math_verify")  # in the test extra, so CI runs it
    assert ev.scorer() == ("math-verify", ev.verified)
    assert ev.verified(pred, reference, kind) is verified


def test_math_verify_parses_the_reference_by_kind():
    """A bare expression does not read a letter; LaTeX does (so the toy's letters are "latex")."""
    pytest.importorskip("math_verify")
    assert not ev.verified("F", "F", "expr") and ev.verified("F", "F", "latex")


def test_without_math_verify_the_exact_match_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "math_verify", None)  # import fails, as if not installed
    assert ev.scorer() == ("exact-match", ev.exact_match)
    assert ev.main(TOY + ["--out", str(tmp_path), str(TOY_EVAL), "--limit", "4"]) == 0
    out = capsys.readouterr()
    assert "note: scoring with exact-match (pip install -e '.[eval]' for math-verify" in out.err
    assert "| scorer exact-match" in out.out


def test_generate_has_no_eval_left(capsys):
    with pytest.raises(SystemExit):
        generate.parse_args(["--help"])
    help = capsys.readouterr().out
    assert "--html" in help and not any(f in help for f in ("--eval", "--batch-size", "--instruction"))


def test_the_script_runs_as_a_command(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "eval.py"), *TOY, "--limit", "3", "--out",
                        str(tmp_path), str(TOY_EVAL)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert table(r.stdout)["toy-eval"][0] == 3 and "[toy-eval] 3/3 | accuracy" in r.stderr
