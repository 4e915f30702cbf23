"""Accuracy on the paper's math benchmarks, resumable, printed beside the paper's numbers.

A benchmark comes from the Hugging Face hub (its data files only, never code) with the source,
split and fields of the authors' evaluation, or from a local FILE (JSONL or parquet, a `question`
or `problem` field and an `answer`). The protocol is the authors': the bare question as the user
turn, the published sampling, decider threshold 0.9, up to 4096 new tokens. The answer of a reply
is its last \\boxed{} (else its first word), judged by math-verify as the authors parse the
reference (pip install -e ".[eval]"), else by an exact match. Every scored problem is appended,
as it finishes, to one JSONL file per model and benchmark in --out; the same command run again
skips the problems already there, and other settings are refused, never mixed in.

    python bench/eval.py --model runs/0.6b/tah paper              # the five of the paper's table
    python bench/eval.py --model runs/0.6b/tah math500 --limit 100  # the oracle study's problems
    python bench/eval.py --model DIR gsm8k=~/data/gsm8k            # a benchmark downloaded by hand
    python bench/eval.py --model runs/toy/tah --greedy --max-new-tokens 1 \\
        tests/fixtures/toy-eval.jsonl                              # the toy's held-out set
"""
import argparse
import json
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import generate  # noqa: E402
import tah  # noqa: E402


@dataclass(frozen=True)
class Benchmark:
    """Where a benchmark's problems are and how its reference answers read."""
    repo: str  # the hub dataset
    split: str
    question: tuple[str, ...]  # the question's field: the first of these that a row has
    answer: str  # the reference answer's field
    kind: str  # how the authors parse the reference: "expr" (a bare expression) or "latex"
    config: str = "default"  # the subset, as load_dataset(repo, config) names it


# the authors' tah/evaluate/eval_configs/dataset_configs.json, and matheval.py for the kinds
BENCHMARKS = {
    "gsm8k": Benchmark("pss0204/gsm8k_test", "test", ("problem",), "answer", "expr", "gsm8k_test"),
    "math500": Benchmark("HuggingFaceH4/MATH-500", "test", ("problem",), "answer", "latex"),
    "amc23": Benchmark("math-ai/amc23", "test", ("question",), "answer", "latex"),
    "aime24": Benchmark("Maxwell-Jia/AIME_2024", "train", ("Problem",), "Answer", "expr"),
    "aime25": Benchmark("yentinglin/aime_2025", "train", ("problem",), "answer", "expr"),
    "olympiadbench": Benchmark("realtreetune/olympiadbench", "test", ("problem",), "answer",
                               "latex"),
}
FILE = Benchmark("", "", ("question", "problem"), "answer", "latex")  # a file given by path
PAPER = ["gsm8k", "math500", "amc23", "aime25", "olympiadbench"]  # arXiv v1's headline average
# that average, accuracy %, for Standard / AlwaysThink / TaH / TaH+ (arXiv v1, Qwen3 base models
# trained on OpenR1-Math); a model's size from config.json's (hidden_size, num_hidden_layers),
# 27 layers once TaH pruned one
PAPER_V1 = {"0.6B": (31.2, 23.9, 35.2, 36.5), "1.7B": (47.8, 44.7, 52.8, 53.2)}
SIZES = {(1024, 28): "0.6B", (1024, 27): "0.6B", (2048, 28): "1.7B", (2048, 27): "1.7B"}
DATA_FILES = ["*.parquet", "*.jsonl", "*.json"]  # what a download fetches: data, never code
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass(frozen=True)
class Source:
    """One benchmark of a run: its name, how it reads, and a local path (None: download it)."""
    name: str
    bench: Benchmark
    path: Path | None = None


def sources(text: str) -> list[Source]:
    """The type= of a NAME argument: a benchmark, `paper`, NAME=DIR or a FILE."""
    name, eq, folder = text.partition("=")
    if text == "paper":
        return [Source(n, BENCHMARKS[n]) for n in PAPER]
    if name in BENCHMARKS and not eq:
        return [Source(name, BENCHMARKS[name])]
    if name in BENCHMARKS and Path(folder).expanduser().is_dir():
        return [Source(name, BENCHMARKS[name], Path(folder).expanduser())]
    path = Path(text).expanduser()
    if path.is_file() and path.suffix in (".jsonl", ".json", ".parquet"):
        return [Source(path.stem, FILE, path)]
    raise argparse.ArgumentTypeError(
        f"{text} is no folder" if eq else f"{text} is neither a benchmark ({', '.join(BENCHMARKS)}"
        ", paper) nor a .jsonl or .parquet file")


def download(src: Source) -> Path:
    """The benchmark's data files from the hub (cached), or one line that says what to do."""
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(src.bench.repo, repo_type="dataset",
                                      allow_patterns=DATA_FILES))
    except Exception as e:  # offline, a proxy, a moved dataset: all end the same way
        raise OSError(f"could not download {src.name} ({src.bench.repo}: {type(e).__name__}). "
                      f"Where you have a network, `hf download {src.bench.repo} --repo-type "
                      f"dataset --local-dir DIR`, copy DIR here and give {src.name}=DIR") from None


def split_files(folder: Path, split: str, config: str = "default") -> list[Path]:
    """One config's split's data files in a dataset folder as the hub lays it out. The config's
    files have it as a folder ("gsm8k_test/test-0.parquet", "data/gsm8k_test/...") or a name's
    prefix ("gsm8k_test-test.jsonl"), read as if without it; with none, all files are (one config).
    Of those, the split's name it in their name ("test.jsonl", "data/test-0.parquet"), else in
    their folder; the default config's data/ first; one format, parquet first. With none, every
    data file is the "train" split (the hub's rule for files that name no split)."""
    found = [f for pattern in DATA_FILES for f in sorted(folder.rglob(pattern))]
    files = {f.relative_to(folder): f for f in found}  # its path in the dataset -> its path here
    files = {k: f for k, f in files.items() if not any(p[0] == "." for p in k.parts)}  # .cache/
    ours = re.compile(rf"(^|/){re.escape(config)}(/|[_-](?=[^/]*$))")  # a folder or a prefix
    files = {Path(ours.sub(r"\1", k.as_posix(), count=1)): f for k, f in files.items()
             if ours.search(k.as_posix())} or files
    names = re.compile(rf"(^|[/_.-]){split}([/_.-]|$)").search
    named = [f for f in files if names(f.name)] or [f for f in files if names(f.parent.as_posix())]
    named = named or (list(files) if split == "train" else [])
    named = [f for f in named if f.parts[0] == "data"] or named
    return [files[f] for f in named if f.suffix == named[0].suffix]


def read_problems(path: Path, bench: Benchmark) -> list[tuple[str, str]]:
    """(question, reference) of each row of a JSONL, JSON (a list) or parquet file; a GSM8K
    reference "... #### 42" keeps what follows ####. A file that does not read so is one line."""
    where = f"{path}:1"
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq
            rows = list(enumerate(pq.read_table(path).to_pylist(), 1))
        elif (text := path.read_text(encoding="utf-8")).lstrip().startswith("["):
            rows = list(enumerate(json.loads(text), 1))
        else:  # JSONL, each line read below, so that an error names its line
            rows = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
        problems = []
        for n, row in rows:
            where = f"{path}:{n}"
            row = json.loads(row) if type(row) is str else row
            question = row[next((k for k in bench.question if k in row), bench.question[0])]
            problems.append((str(question), str(row[bench.answer]).split("####")[-1].strip()))
    except ImportError:
        raise ValueError(f"{path} is parquet, which needs pyarrow: pip install -e '.[eval]'") \
            from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{where}: expected rows with {' or '.join(bench.question)} and "
                         f"{bench.answer} ({type(e).__name__}: {e}); fix the file or give "
                         "another") from None
    if not problems:
        raise ValueError(f"{path} holds no problems; give a file with one per row")
    return problems


def problems(src: Source) -> list[tuple[str, str]]:
    """A source's (question, reference) pairs, downloading a benchmark not given as a folder."""
    if src.bench is FILE:
        return read_problems(src.path, FILE)
    folder = src.path or download(src)
    files = split_files(folder, src.bench.split, src.bench.config)
    if not files:
        raise ValueError(f"{folder} has no data files of {src.name}'s {src.bench.split!r} split "
                         f"(*.parquet, *.jsonl); is it a download of {src.bench.repo}?")
    return [p for f in files for p in read_problems(f, src.bench)]


def last_boxed(text: str) -> str | None:
    """The contents of the last \\boxed{...}, braces matched; None if there is none."""
    start, depth = text.rfind("\\boxed{"), 0
    for i in range(start + 6, len(text)) if start >= 0 else ():
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start + 7:i]
    return None


def extract(reply: str) -> str | None:
    """A reply's answer: its last \\boxed{}, else its first word (the toy's one-letter replies)."""
    boxed = last_boxed(reply)
    return boxed if boxed is not None else (reply.split() or [None])[0]


def normalize(s: str) -> str:
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", s)  # \\text{B} -> B
    s = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", s)  # 1,234 -> 1234, but the list 1,2 stays
    return re.sub(r"\s|\$|\\!|\\,", "", s).replace("\\dfrac", "\\frac").rstrip(".")


def exact_match(pred: str | None, answer: str, kind: str = "latex") -> bool:
    """normalize()d answers compared as numbers when both parse, else as text (either kind)."""
    if pred is None:
        return False
    a, b = normalize(pred), normalize(answer)
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-9)
    except ValueError:
        return a == b


def verified(pred: str | None, answer: str, kind: str) -> bool:
    """math-verify's judgement, the reference parsed as the authors do: a bare expression
    ("expr": GSM8K, AIME) or LaTeX in $...$ ("latex": MATH500, AMC23, OlympiadBench)."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
    if pred is None:
        return False
    if kind == "expr":
        gold = parse(answer, extraction_config=[ExprExtractionConfig()])
    else:
        gold = parse(answer if answer.startswith("$") else f"${answer}$",
                     extraction_config=[LatexExtractionConfig()])
    return bool(verify(gold, parse(f"${pred.strip('$')}$")))


def scorer() -> tuple[str, callable]:
    """math-verify (the authors' scorer) when installed, else exact match: (name, judge)."""
    try:
        import math_verify  # noqa: F401
    except ImportError:
        return "exact-match", exact_match
    return "math-verify", verified


def answers(model: tah.TaH, prompts: list[tuple[int, list[int]]], gen: dict,
            batch_size: int):
    """Generates for (id, prompt ids) pairs in left-padded batches; yields (id, tokens, passes)
    for each as soon as it stops (a stop token, not kept, or the length cap)."""
    for b in range(0, len(prompts), batch_size):
        batch = prompts[b:b + batch_size]
        width = max(len(p) for _, p in batch)
        ids = torch.tensor([[-1] * (width - len(p)) + p for _, p in batch])  # (B, T); -1 = pad
        made = {i: ([], []) for i in range(len(batch))}  # the rows still going: tokens, passes
        for t, p in tah.generate(model, ids.clamp(min=0), valid=ids >= 0, **gen):
            for i, (token, passes) in enumerate(zip(t.tolist(), p.tolist())):
                if i in made and token in gen["stop_ids"]:
                    yield batch[i][0], *made.pop(i)
                elif i in made:
                    made[i][0].append(token)
                    made[i][1].append(passes)
        for i, (tokens, passes) in made.items():  # the length cap
            yield batch[i][0], tokens, passes


def read_results(path: Path, settings: dict) -> dict[int, dict]:
    """The problems a results file holds, by id; a new file starts with the settings line. A
    file of other settings is refused; a partial last line (a run killed mid-write) is cut."""
    data = path.read_bytes() if path.exists() else b""
    if data and not data.endswith(b"\n"):  # a run killed while it wrote a line: cut that line
        print(f"note: {path}: cut off a partial last line (a run stopped mid-write)",
              file=sys.stderr)
        data = data[:data.rfind(b"\n") + 1]
        path.write_bytes(data)
    if not data:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"settings": settings}) + "\n", encoding="utf-8")
    try:
        first, *rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        theirs, done = first["settings"], {r["id"]: r for r in rows}
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a results file of bench/eval.py ({type(e).__name__}: "
                         f"{e}); give another --out or delete it") from None
    changed = [f"{k} {theirs.get(k)!r} there, {settings.get(k)!r} now"
               for k in sorted(settings.keys() | theirs.keys()) if theirs.get(k) != settings.get(k)]
    if changed:
        raise ValueError(f"{path} holds results of other settings ({'; '.join(changed)}); rerun "
                         "with those, or give another --out") from None
    return done


def duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def prompt_ids(tok: tah.Tokenizer, question: str, a: argparse.Namespace, raw: bool,
               think: bool) -> list[int]:
    """The prompt of a problem: the bare question as the user turn (the authors' protocol), after
    --system if given, with --instruction appended if given."""
    text = f"{question}\n{a.instruction}" if a.instruction else question
    system = [{"role": "system", "content": a.system}] if a.system else []
    return generate.prompt_ids(tok, system + [{"role": "user", "content": text}], raw, think)


def evaluate(model, tok, src: Source, items: list, todo: list, done: dict, path: Path, *,
             gen: dict, judge, batch_size: int) -> None:
    """Answers the (id, prompt ids) of todo, the ids into items, appending each scored row to
    path as it finishes (flushed) and to done, with progress on stderr: done / total, accuracy,
    tokens/s, an ETA."""
    if not todo:
        print(f"[{src.name}] {len(done)}/{len(items)} already in {path}", file=sys.stderr)
    made, t0, left = 0, time.perf_counter(), len(todo)
    with path.open("a", encoding="utf-8") as f:
        for i, tokens, passes in answers(model, todo, gen, batch_size):
            question, reference = items[i]
            reply = tok.decode(tokens)
            pred = extract(reply)
            iterated = sum(p > 1 for p in passes)
            done[i] = dict(id=i, question=question, reference=reference, reply=reply,
                           answer=pred, correct=bool(judge(pred, reference, src.bench.kind)),
                           tokens=len(tokens), iterated=iterated,
                           share_iterated=round(iterated / max(len(tokens), 1), 4))
            f.write(json.dumps(done[i]) + "\n")
            f.flush()
            made, left, seconds = made + len(tokens), left - 1, time.perf_counter() - t0
            right = sum(r["correct"] for r in done.values())
            eta = seconds / (len(todo) - left) * left
            print(f"[{src.name}] {len(done)}/{len(items)} | accuracy {right}/{len(done)} = "
                  f"{right / len(done):.1%} | {made / max(seconds, 1e-9):.1f} tokens/s | "
                  f"ETA {duration(eta)}", file=sys.stderr)


def summary(name: str, rows: list[dict]) -> tuple:
    """(name, problems, accuracy, mean tokens, share iterated) of a benchmark's scored rows."""
    n, tokens = len(rows), sum(r["tokens"] for r in rows)
    return (name, n, sum(r["correct"] for r in rows) / max(n, 1), tokens / max(n, 1),
            sum(r["iterated"] for r in rows) / max(tokens, 1))


def table(rows: list[tuple], size: str | None) -> str:
    """The result table: a row per benchmark, their average (problems: the total), and for a
    size the paper reports its numbers, labelled with the paper's version."""
    lines = [f"{'benchmark':<16}{'problems':>9}{'accuracy':>10}{'mean tokens':>13}{'iterated':>10}"]
    average = ("average", sum(r[1] for r in rows), *(sum(r[k] for r in rows) / len(rows)
                                                      for k in (2, 3, 4)))
    for name, n, accuracy, tokens, share in rows + [average]:
        lines.append(f"{name:<16}{n:>9}{accuracy:>10.1%}{tokens:>13.1f}{share:>10.1%}")
    if size in PAPER_V1:
        numbers = " | ".join(f"{m} {x}" for m, x in zip(
            ("Standard", "AlwaysThink", "TaH", "TaH+"), PAPER_V1[size]))
        lines += [f"paper, arXiv v1, Qwen3-{size} (average of {', '.join(PAPER)}, all "
                  f"problems): {numbers}",
                  "(arXiv v2 reports nine benchmarks, math, QA and code, with other numbers, "
                  "for models trained on other data)"]
    return "\n".join(lines)


def out_folder(text: str) -> Path:
    """The type= of --out: a folder, there or to be made, never a file."""
    if (path := Path(text).expanduser()).is_file():
        raise argparse.ArgumentTypeError(f"{text} is a file; --out is the folder of the results "
                                         "files, one per model and benchmark: give a folder")
    return path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The flags, checked before anything loads (ValueError: what was wrong, what to do)."""
    p = generate.Parser(prog="python bench/eval.py", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("names", nargs="+", type=sources, metavar="NAME", help=f"{', '.join(BENCHMARKS)}; paper "
        "(the five of the paper's table); NAME=DIR, a benchmark downloaded by hand (`hf download "
        "REPO --repo-type dataset --local-dir DIR`); or a FILE (.jsonl or .parquet rows with a "
        "question or problem, and an answer)")
    generate.model_flags(p, threshold=0.9, length=4096)
    add("--limit", type=generate.positive, help="only the first N problems of each benchmark")
    add("--batch-size", type=generate.positive, default=1, help="questions generated together "
        "(default %(default)s)")
    add("--instruction", nargs="?", const=INSTRUCTION, metavar="TEXT", help="append TEXT to each "
        f"question (without TEXT: \"{INSTRUCTION}\"; the authors append none)")
    add("--out", type=out_folder, default="runs/eval", help="the folder of the results files, "
        "one per model and benchmark (default %(default)s)")
    return p.parse_args(argv)


def run(a: argparse.Namespace) -> int:
    """Reads the benchmarks, loads the model, answers what is not yet answered, prints the table."""
    chosen = {s.name: s for group in a.names for s in group}  # in order, each once
    data = {name: problems(s)[:a.limit] for name, s in chosen.items()}
    model, tok, gen, raw, think = generate.setup(a)
    name, judge = scorer()
    print(f"note: scoring with {name}" + " (pip install -e '.[eval]' for math-verify, the "
          "authors' scorer)" * (name != "math-verify"), file=sys.stderr)
    local = Path(a.model).expanduser()  # a directory, or a hub id
    settings = {k: gen[k] for k in ("policy", "threshold", "temperature", "top_p", "top_k",
                                    "min_p", "max_new_tokens")}
    settings |= dict(model=str(local.resolve()) if local.is_dir() else a.model, seed=a.seed,
                     system=a.system, raw=raw, think=think, instruction=a.instruction,
                     scorer=name)
    tag = re.sub(r"[^\w.-]+", "_", settings["model"].strip("/"))  # /a/b/tah -> a_b_tah
    paths = {n: a.out / f"{tag}--{n}.jsonl" for n in chosen}
    done = {n: read_results(paths[n], settings | {"data": s.bench.repo or str(s.path.resolve())})
            for n, s in chosen.items()}  # every file checked before any generation
    print("note: Ctrl-C stops; the same command goes on where it stopped", file=sys.stderr)
    rows = []
    for n, src in chosen.items():
        done[n] = {i: r for i, r in done[n].items() if i < len(data[n])}  # within --limit
        todo = [(i, prompt_ids(tok, q, a, raw, think)) for i, (q, _) in enumerate(data[n])
                if i not in done[n]]
        evaluate(model, tok, src, data[n], todo, done[n], paths[n], gen=gen, judge=judge,
                 batch_size=a.batch_size)
        rows.append(summary(n, list(done[n].values())))
    temperature = "greedy" if gen["temperature"] == 0 else \
        f"temperature {gen['temperature']:g}, top-p {gen['top_p']:g}, top-k {gen['top_k']}"
    print(f"model {a.model} | policy {gen['policy']} | threshold {gen['threshold']:g} | "
          f"{temperature} | max {gen['max_new_tokens']} new tokens | scorer {name}")
    config = model.config
    print(table(rows, SIZES.get((config.hidden_size, config.num_hidden_layers))))
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status (0 done, 2 a user error, 130 interrupted)."""
    return generate.main(argv, parse=parse_args, go=run)


if __name__ == "__main__":
    sys.exit(main())
