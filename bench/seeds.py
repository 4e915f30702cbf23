"""train.py once per seed: every number of each seed, then its mean and range over the seeds.

    python bench/seeds.py                          # the toy on seeds 0, 1, 2 (the README's table)
    python bench/seeds.py --seeds 0 1 2 3 4        # more seeds
    python bench/seeds.py --seeds 0 1 --steps 300  # any other flag goes to train.py as it is

Each seed runs `train.main` in OUT/seed-N (OUT: train.py's --out, runs/toy for the toy), so an
interrupted command resumes where it stopped, as train.py does. OUT/summary.json keeps
{model: {policy: {metric: [mean, min, max]}}}.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository: train.py
sys.path.insert(0, str(ROOT))
import train  # noqa: E402

COLUMNS = dict(acc="acc", iterating="iter", iterating_all="all", acc_easy="1-hop",
               acc_hard="2-hop")  # metric of eval.json: its column


def summarize(results: list[dict]) -> dict:
    """{model: {policy: {metric: [mean, min, max]}}} over runs with the same models and policies."""
    return {m: {p: {k: [sum(r[m][p][k] for r in results) / len(results),
                        min(r[m][p][k] for r in results), max(r[m][p][k] for r in results)]
                    for k in metrics} for p, metrics in per.items()}
            for m, per in results[0].items()}


def table(title: str, rows: dict, cell, width: int) -> None:
    """Prints rows {model: {policy: {metric: value}}}, a column per metric of COLUMNS that they
    have (blank where a row lacks it), each cell as cell(value) formats it."""
    print(f"\n{title}\n{'model':14} {'policy':8}" +
          "".join(f"{c:>{width}}" for c in COLUMNS.values()))
    for model, per in rows.items():
        for policy, m in per.items():
            print(f"{model:14} {policy:8}" + "".join(f"{cell(m[k]):>{width}}" if k in m else
                                                     " " * width for k in COLUMNS))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,  # --seed goes to train.py
                                usage="%(prog)s [--seeds N ...] [train.py flags]",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="a train.py run each")
    a, flags = p.parse_known_args(argv)
    out = Path(train.parse_args(flags).out)  # train.py's --out for these flags: checked, not made
    results = [train.main(flags + ["--seed", str(s), "--out", str(out / f"seed-{s}")])
               for s in a.seeds]
    summary = summarize(results)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    seeds = " / ".join(map(str, a.seeds))
    per_seed = {m: {p: {k: [r[m][p][k] for r in results] for k in metrics}
                    for p, metrics in per.items()} for m, per in results[0].items()}
    table(f"seed {seeds}", per_seed, lambda v: " / ".join(f"{x:.3f}" for x in v),
          width=8 * len(a.seeds) + 1)
    table(f"seeds {seeds}: mean [min, max]", summary,
          lambda m: f"{m[0]:.3f} [{m[1]:.3f}, {m[2]:.3f}]", width=23)
    return summary


if __name__ == "__main__":
    main()
