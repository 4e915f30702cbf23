"""Draws the tutorial's pictures as plain SVG files, deterministically.

  duo_mask.svg     the duo-causal mask of the worked example (5 positions, positions 1 and 3 take
                   pass 2): which (position, pass) query may attend to which (position, pass) key
  pipeline.svg     one whole TaH forward of the trained toy model on a typical row, with the shape
                   of every tensor: pass 1, the decider, the gather, pass 2, the logit residual
  token_trace.svg  one unseen row of the toy task read by the trained toy model (teacher-forced,
                   with its own decider and threshold): each token coloured by the passes spent
                   predicting it, each answer marked right or wrong

The SVG is built as a string with integer coordinates, no timestamps and no randomness, so the
same code and checkpoint give the same bytes; tests/test_tutorial.py checks that the committed
files are exactly what this script writes.

    python tutorial/figures.py                        # rewrites tutorial/figures/*.svg
    python tutorial/figures.py --out /tmp/figs        # somewhere else
    python tutorial/figures.py --toy path/to/toy-tah  # another trained toy checkpoint
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import tah  # noqa: E402  (the repository's model, not an installed copy)
import train  # noqa: E402  (its toy data; importing it runs nothing)

TOY = ROOT / "tests" / "fixtures" / "toy-tah"  # `python train.py` (defaults, seed 0): its tah/
# The token trace's row, one that no training step saw: train.toy_data(300, 0, seed=2), row 124 (a
# table `k>v`, the separator, then 16 queries `marker letter answer`; `2:` asks for
# table[table[x]]). Picked for what chapter 7 points out in it: 2-hop queries whose letter maps to
# itself (2: E, 2: J) and a first answer that pass 1 gets alone (2: H, with H>D and D>H). So fewer
# of its tokens iterate than on a typical row; the pipeline figure reads a typical one instead.
TRACE_ROW = ("J>J A>F H>D C>I I>G F>C E>E D>H G>A B>B | 2: H H 1: B B 2: I A 2: E E 2: D D 1: D H "
             "2: E E 2: I A 1: G A 1: G A 1: B B 2: G F 1: B B 1: F C 1: I G 2: J J")

ATTEND, BLOCKED, MISSING = "#2b6cb0", "#ffffff", "#d4d4d4"  # mask cell colours
ONE_PASS, TWO_PASSES = "#edf2f7", "#f6ad55"  # trace box colours
RIGHT, WRONG = "#2f855a", "#c53030"  # answer marks
PASS1, DECIDE, PASS2 = "#ebf4ff", "#fefcbf", "#feebc8"  # pipeline box colours
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


# ----------------------------------------------------------------------------- the pipeline


def typical_row(toy: Path = TOY, n: int = 200) -> str:
    """A typical row for the pipeline: of n rows that no training step saw (train.toy_data(n, 0,
    seed=1), the fresh rows of chapters 0 and 5), the first on which the decider sends the median
    number of tokens through pass 2."""
    model, data = tah.load(toy), train.toy_data(n, 0, seed=1)
    ids = data["ids"].long().view(n, -1)  # (n, 59)
    with torch.no_grad():
        second = (model(ids, "decider").iter_count == 2).sum(1)  # (n,) tokens that iterate
    row = int((second == second.median()).nonzero()[0])
    return " ".join(train.TOY_VOCAB[i] for i in ids[row].tolist())


def pipeline_shapes(toy: Path = TOY, row: str | None = None) -> dict:
    """The sizes of one TaH forward of the toy model on one row (default: typical_row), read off
    the run itself."""
    row = typical_row(toy) if row is None else row
    model, tok = tah.load(toy), tah.load_tokenizer(toy)
    ids = torch.tensor([tok.encode(row)])
    with torch.no_grad():
        out = model(ids, "decider")
    idx, _ = tah.hard_first(out.iter_count == 2)
    c, t = model.config, model.tah
    return dict(B=ids.shape[0], T=ids.shape[1], H=c.hidden_size, V=c.vocab_size, L=c.num_hidden_layers,
                T_d=idx.shape[1], layers=list(t.decider_layers), threshold=t.threshold, k=t.input_topk,
                active=int((out.iter_count == 2).sum()), logits=tuple(out.logits.shape))


def pipeline_steps(s: dict) -> list[tuple[str, str, str]]:
    """(colour, what happens, the tensor it produces with its shape) for each step of the forward."""
    B, T, H, V, L, T_d = s["B"], s["T"], s["H"], s["V"], s["L"], s["T_d"]
    return [
        (PASS1, "input_ids", f"(B, T) = ({B}, {T})"),
        (PASS1, "embed_tokens", f"x (B, T, H) = ({B}, {T}, {H})"),
        (PASS1, f"pass 1: {L} decoder layer(s), LoRA off, causal mask", f"(B, T, H) = ({B}, {T}, {H})"),
        (PASS1, "final norm, lm_head", f"z1 (B, T, V) = ({B}, {T}, {V})"),
        (DECIDE, f"decider: hidden states {s['layers']} + top-k of z1", f"logit (B, T) = ({B}, {T})"),
        (DECIDE, f"sigmoid > {s['threshold']}: {s['active']} of {B * T} tokens iterate",
         f"active (B, T) = ({B}, {T})"),
        (PASS2, "hard_first: actives first (stable argsort)", f"idx, q_valid (B, T_d) = ({B}, {T_d})"),
        (PASS2, f"soft_token(z1[idx]): top-{s['k']} mix of embedding rows", f"x (B, T_d, H) = ({B}, {T_d}, {H})"),
        (PASS2, "pass 2: the same layer(s), LoRA on, duo-causal mask", f"mask (B, T_d, T + T_d) = ({B}, {T_d}, {T + T_d})"),
        (PASS2, "final norm, lm_head", f"z2 (B, T_d, V) = ({B}, {T_d}, {V})"),
        (PASS1, "add_logit_residual: logits[idx] += z2", f"z1 + z2 or z1 (B, T, V) = ({B}, {T}, {V})"),
    ]


def pipeline_svg(toy: Path = TOY) -> str:
    steps = pipeline_steps(pipeline_shapes(toy))
    width, left, box_w, box_h, gap = 820, 20, 440, 30, 16
    body = [text(width // 2, 22, "one TaH forward of the trained toy model on a typical row, with shapes", 13)]
    y = 40
    for i, (fill, what, shape) in enumerate(steps):
        body.append(rect(left, y, box_w, box_h, fill, stroke=INK))
        body.append(text(left + 8, y + 19, what, 11, anchor="start"))
        body.append(text(left + box_w + 12, y + 19, shape, 11, anchor="start"))
        if i < len(steps) - 1:  # an arrow down to the next step
            x, y1, y2 = left + box_w // 2, y + box_h, y + box_h + gap
            body.append(f'<line x1="{x}" y1="{y1}" x2="{x}" y2="{y2}" stroke="{INK}"/>')
            body.append(f'<path d="M{x - 4},{y2 - 6} L{x},{y2} L{x + 4},{y2 - 6}" fill="none" stroke="{INK}"/>')
        y += box_h + gap
    legend = [(PASS1, "every token: pass 1, and the output"), (DECIDE, "the decider: who iterates"),
              (PASS2, "only the gathered tokens: pass 2")]
    for i, (fill, label) in enumerate(legend):
        body.append(rect(left, y + i * 22, 16, 16, fill, stroke=INK))
        body.append(text(left + 24, y + i * 22 + 13, label, 12, anchor="start"))
    y += len(legend) * 22 + 4
    body.append(text(left, y + 12, "B batch, T tokens, H hidden size, V vocabulary, T_d the most tokens "
                     "iterating in any row", 11, anchor="start"))
    body.append(text(left, y + 30, "the row: of 200 fresh rows (train.toy_data(200, 0, seed=1)), the "
                     "first with the median count of tokens that iterate", 11, anchor="start"))
    return svg(width, y + 42, body)


# ----------------------------------------------------------------------------- the token trace


def token_label(s: str) -> str:
    """Control characters as escapes, so every token shows as a box."""
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in s)


def trace(toy: Path = TOY, row: str = TRACE_ROW) -> list[tuple[str, int, bool, bool]]:
    """Per token of the row: (label, passes spent predicting it (0 for the first token), whether it
    is a scored answer, whether the model's final argmax at the previous position is this token).
    Teacher-forced, as the toy is evaluated, with the checkpoint's own decider and threshold."""
    model, tok = tah.load(toy), tah.load_tokenizer(toy)
    ids = tok.encode(row)
    with torch.no_grad():
        out = model(torch.tensor([ids]), "decider")
    passes = [0] + out.iter_count[0, :-1].tolist()  # position t-1's passes shaped token t
    right = [False] + (out.logits[0, :-1].argmax(-1) == torch.tensor(ids[1:])).tolist()
    sep = ids.index(tok.tok.token_to_id("|"))
    answer = [t > sep and (t - sep) % 3 == 0 for t in range(len(ids))]  # marker, letter, answer
    return [(token_label(tok.decode([i])), p, a, r) for i, p, a, r in zip(ids, passes, answer, right)]


def token_trace_svg(toy: Path = TOY) -> str:
    tokens = trace(toy)
    width, char, h, gap, left = 760, 8, 26, 6, 20
    body = [text(width // 2, 22, "the trained toy model reads an unseen row: passes spent predicting each token", 13)]
    x, y, drawn = left, 44, set()
    for label, p, answer, right in tokens:
        w = 12 + char * len(label)
        if x + w > width - left:
            x, y = left, y + h + 26
        dash = ' stroke-dasharray="1 3"' if p == 0 else ""
        body.append(rect(x, y, w, h, {0: "#ffffff", 1: ONE_PASS, 2: TWO_PASSES}[p], stroke=INK, extra=dash))
        body.append(text(x + w // 2, y + 18, label, 13))
        drawn.add(p)
        if answer:
            body.append(text(x + w // 2, y + h + 15, "✓" if right else "✗", 13,
                             extra=f' style="fill:{RIGHT if right else WRONG}"'))
            drawn.add("right" if right else "wrong")
        x += w + gap
    y += h + 44
    legend = [(1, ONE_PASS, "", "1 pass: pass 1 only"),
              (2, TWO_PASSES, "", "2 passes: the decider chose a second pass"),
              (0, "#ffffff", ' stroke-dasharray="1 3"', "first token: no position predicted it")]
    for key, fill, dash, label in legend:  # only what the figure shows
        if key in drawn:
            body.append(rect(left, y, 16, 16, fill, stroke=INK, extra=dash))
            body.append(text(left + 24, y + 13, label, 12, anchor="start"))
            y += 22
    for key, colour, label in [("right", RIGHT, "✓ an answer the model gets right (final argmax)"),
                               ("wrong", WRONG, "✗ an answer the model gets wrong")]:
        if key in drawn:
            body.append(text(left, y + 13, label, 12, anchor="start", extra=f' style="fill:{colour}"'))
            y += 22
    body.append(text(left, y + 12, f"toy-tah (python train.py, seed 0), decider threshold {tah.load(toy).tah.threshold}; "
                     "1: x asks table[x], 2: x table[table[x]]", 11, anchor="start"))
    return svg(width, y + 24, body)


FIGURES = {"duo_mask.svg": lambda toy: duo_mask_svg(), "pipeline.svg": pipeline_svg,
           "token_trace.svg": token_trace_svg}


def write_all(out: Path, toy: Path = TOY) -> list[Path]:
    if not (toy / "config.json").exists():
        raise FileNotFoundError(f"{toy} is not a trained toy checkpoint (no config.json); "
                                "pass --toy with the path of tests/fixtures/toy-tah")
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, draw in FIGURES.items():
        (out / name).write_bytes(draw(toy).encode("utf-8"))
        paths.append(out / name)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "tutorial" / "figures",
                    help="directory to write the SVG files into (default: tutorial/figures)")
    ap.add_argument("--toy", type=Path, default=TOY,
                    help="the trained toy checkpoint that the pipeline and the token trace read "
                         "(default: tests/fixtures/toy-tah)")
    args = ap.parse_args()
    torch.set_num_threads(1)  # one thread: the same float sums on every machine
    for path in write_all(args.out, args.toy):
        print(path)


if __name__ == "__main__":
    main()
