"""Draws the tutorial's pictures as plain SVG files, deterministically.

  duo_mask.svg     the duo-causal mask of the worked example (5 positions, positions 1 and 3 take
                   pass 2): which (position, pass) query may attend to which (position, pass) key
  token_trace.svg  a prompt and a greedy continuation of the fixture checkpoint, each token coloured
                   by the passes the model spent predicting it (what `tah.generate` reports)

The SVG is built as a string with integer coordinates, no timestamps and no randomness, so the
same code and checkpoint give the same bytes; tests/test_tutorial.py checks that the committed
files are exactly what this script writes.

    python tutorial/figures.py                        # rewrites tutorial/figures/*.svg
    python tutorial/figures.py --out /tmp/figs        # somewhere else
    python tutorial/figures.py --fixture path/to/official-tiny
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import tah  # noqa: E402  (the repository's model, not an installed copy)

FIXTURE = ROOT / "tests" / "fixtures" / "official-tiny"
TRACE_PROMPT = "Question: what is 6 times 7? Answer:"
TRACE_NEW_TOKENS = 8

ATTEND, BLOCKED, MISSING = "#2b6cb0", "#ffffff", "#d4d4d4"  # mask cell colours
ONE_PASS, TWO_PASSES, NO_PREDICTOR = "#edf2f7", "#f6ad55", "#ffffff"  # trace box colours
HIGHLIGHT, INK, GRID = "#c05621", "#1a202c", "#a0aec0"
FONT = 'font-family="DejaVu Sans Mono, Menlo, Consolas, monospace"'


def esc(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def text(x: int, y: int, s: str, size: int = 12, anchor: str = "middle", extra: str = "") -> str:
    return f'<text x="{x}" y="{y}" font-size="{size}" text-anchor="{anchor}" fill="{INK}"{extra}>{esc(s)}</text>'


def rect(x: int, y: int, w: int, h: int, fill: str, stroke: str = GRID, extra: str = "") -> str:
    return f'<rect x="{x}" y="{y}" width="{w}" height="{h}" fill="{fill}" stroke="{stroke}"{extra}/>'


def svg(width: int, height: int, body: list[str]) -> str:
    head = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" {FONT}>')
    return "\n".join([head, rect(0, 0, width, height, "#ffffff", stroke="none"), *body, "</svg>"]) + "\n"


# ----------------------------------------------------------------------------- the duo-causal mask


def mask_states(n_pos: int = 5, iterating: tuple[int, ...] = (1, 3), max_iter: int = 2):
    """The grid of the figure: entries (position, pass) in depth-major order (as the model lays out
    its keys) and, per (query entry, key entry), "attend", "blocked" or "missing" (the query or
    the key was never computed, because that token did not get that pass)."""
    entries = [(p, d) for d in range(1, max_iter + 1) for p in range(n_pos)]
    pos = torch.tensor([p for p, _ in entries])
    depth = torch.tensor([d for _, d in entries])
    exists = torch.tensor([d == 1 or p in iterating for p, d in entries])
    rule = tah.duo_causal_mask(pos[:, None], depth[:, None], pos[None, :], depth[None, :])  # (Q, K)
    allowed = rule & exists[None, :] & exists[:, None]
    states = [["attend" if allowed[q, k] else "blocked" if exists[q] and exists[k] else "missing"
               for k in range(len(entries))] for q in range(len(entries))]
    return entries, states


def duo_mask_svg() -> str:
    entries, states = mask_states()
    n, cell = len(entries), 30
    left, top = 150, 92
    colour = {"attend": ATTEND, "blocked": BLOCKED, "missing": MISSING}
    width = left + n * cell + 40
    body = [text(width // 2, 22, "duo-causal mask: positions 1 and 3 take pass 2", 13),
            text(left + n * cell // 2, 48, "keys (position j, pass e)", 12)]
    for k, (p, d) in enumerate(entries):  # column headers: pass group, then position
        x = left + k * cell + cell // 2
        body.append(text(x, top - 8, str(p), 11))
        if p == 0:
            body.append(text(left + k * cell + 5 * cell // 2, top - 26, f"pass {d}", 11))
    for q, (p, d) in enumerate(entries):
        y = top + q * cell
        body.append(text(left - 12, y + 19, str(p), 11, anchor="end"))
        if p == 0:
            body.append(text(left - 44, y + 5 * cell // 2 + 4, f"pass {d}", 11, anchor="end"))
        for k in range(n):
            body.append(rect(left + k * cell, y, cell, cell, colour[states[q][k]]))
    mid = left + n * cell // 2
    body.append(f'<line x1="{mid}" y1="{top - 36}" x2="{mid}" y2="{top + n * cell}" stroke="{INK}" stroke-width="2"/>')
    body.append(f'<line x1="{left - 100}" y1="{top + n * cell // 2}" x2="{left + n * cell}" '
                f'y2="{top + n * cell // 2}" stroke="{INK}" stroke-width="2"/>')
    body.append(text(22, top + n * cell // 2, "queries (position i, pass d)", 12,
                     extra=f' transform="rotate(-90 22 {top + n * cell // 2})"'))
    for p, d in [(3, 2), (4, 1)]:  # the rows of the worked example
        q = entries.index((p, d))
        body.append(rect(left, top + q * cell, n * cell, cell, "none", stroke=HIGHLIGHT,
                         extra=' stroke-width="3"'))
    y = top + n * cell + 30
    legend = [(ATTEND, "may attend"), (BLOCKED, "blocked: j > i or e > d"),
              (MISSING, "not computed (token did not take that pass)")]
    for i, (fill, label) in enumerate(legend):
        body.append(rect(20, y + i * 22, 16, 16, fill))
        body.append(text(44, y + i * 22 + 13, label, 12, anchor="start"))
    body.append(rect(20, y + 3 * 22, 16, 16, "none", stroke=HIGHLIGHT, extra=' stroke-width="3"'))
    body.append(text(44, y + 3 * 22 + 13, "worked example: query (3, pass 2) and query (4, pass 1)", 12, anchor="start"))
    return svg(width, y + 4 * 22 + 12, body)


# ----------------------------------------------------------------------------- the token trace


def token_label(s: str) -> str:
    """Spaces as a middle dot, control characters as escapes, so every token shows as a box."""
    return "".join("·" if c == " " else c if c.isprintable() else f"\\x{ord(c):02x}" for c in s)


def trace(fixture: Path, prompt: str = TRACE_PROMPT, new_tokens: int = TRACE_NEW_TOKENS):
    """(token strings, passes spent predicting each token or 0 for the first, number of prompt
    tokens), greedy, with the checkpoint's own decider and threshold."""
    model, tok = tah.load(fixture), tah.load_tokenizer(fixture)
    ids = tok.encode(prompt)
    with torch.no_grad():  # prefill: position t's passes shaped the prediction of token t+1
        prompt_passes = model(torch.tensor([ids]), "decider").iter_count[0].tolist()
    steps = list(tah.generate(model, ids, new_tokens))
    tokens = ids + [int(t[0]) for t, _ in steps]
    passes = [0] + prompt_passes[:-1] + [int(p[0]) for _, p in steps]
    return [token_label(tok.decode([i])) for i in tokens], passes, len(ids)


def token_trace_svg(fixture: Path = FIXTURE) -> str:
    labels, passes, n_prompt = trace(fixture)
    width, char, h, gap, left = 720, 8, 26, 6, 20
    body = [text(width // 2, 22, "greedy decoding with the decider: passes spent predicting each token", 13)]
    x, y = left, 44
    for i, (label, p) in enumerate(zip(labels, passes)):
        w = 12 + char * len(label)
        if x + w > width - left:
            x, y = left, y + h + 22
        fill = {0: NO_PREDICTOR, 1: ONE_PASS, 2: TWO_PASSES}[p]
        dash = ' stroke-dasharray="4 3"' if i < n_prompt else ""
        body.append(rect(x, y, w, h, fill, stroke=INK, extra=dash))
        body.append(text(x + w // 2, y + 18, label, 13))
        if p:
            body.append(text(x + w // 2, y + h + 13, str(p), 10))
        x += w + gap
    y += h + 44
    legend = [(ONE_PASS, "", "1 pass (pass 1 only)"), (TWO_PASSES, "", "2 passes (the decider chose a second pass)"),
              ("#ffffff", ' stroke-dasharray="4 3"', "prompt token (prefill); solid border: generated"),
              (NO_PREDICTOR, ' stroke-dasharray="1 3"', "first token: no position predicted it")]
    for i, (fill, dash, label) in enumerate(legend):
        body.append(rect(left, y + i * 22, 16, 16, fill, stroke=INK, extra=dash))
        body.append(text(left + 24, y + i * 22 + 13, label, 12, anchor="start"))
    y += len(legend) * 22 + 4
    body.append(text(left, y + 12, "official-tiny fixture: random weights, threshold 0.7825. "
                     "It shows the bookkeeping, not skill.", 11, anchor="start"))
    return svg(width, y + 24, body)


FIGURES = {"duo_mask.svg": lambda fixture: duo_mask_svg(), "token_trace.svg": token_trace_svg}


def write_all(out: Path, fixture: Path = FIXTURE) -> list[Path]:
    if not (fixture / "config.json").exists():
        raise FileNotFoundError(f"{fixture} is not the official-tiny fixture (no config.json); "
                                "pass --fixture with the path of tests/fixtures/official-tiny")
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, draw in FIGURES.items():
        (out / name).write_bytes(draw(fixture).encode("utf-8"))
        paths.append(out / name)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "tutorial" / "figures",
                    help="directory to write the SVG files into (default: tutorial/figures)")
    ap.add_argument("--fixture", type=Path, default=FIXTURE,
                    help="the official-tiny checkpoint used for the token trace "
                         "(default: tests/fixtures/official-tiny)")
    args = ap.parse_args()
    torch.set_num_threads(1)  # one thread: the same float sums on every machine
    for path in write_all(args.out, args.fixture):
        print(path)


if __name__ == "__main__":
    main()
