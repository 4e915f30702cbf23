"""Draws the tutorial's pictures as plain SVG files, deterministically.

  duo_mask.svg     the duo-causal mask of the worked example (5 positions, positions 1 and 3 take
                   pass 2): which (position, pass) query may attend to which (position, pass) key
  pipeline.svg     one whole TaH forward of the trained toy model on a typical row, with the shape
                   of every tensor: pass 1, the decider, the gather, pass 2, the logit residual
  token_trace.svg  one unseen row of the toy task read by the trained toy model (teacher-forced,
                   with its own decider and threshold): each token coloured by the passes spent
                   predicting it, each answer marked right or wrong
  hard_first.svg   tah.hard_first on a batch of three rows: each row's active tokens packed first,
                   shorter rows filled up with inactive tokens (fillers, q_valid False)
  keys_cache.svg   where the keys live: what tah.Keys records per depth in one forward (chapter 4's
                   batch), and the depth-major tah.KVCache of generation with its valid mask
  training_stages.svg  the two training stages: who iterates, what trains, what is frozen, which
                   labels and which loss (train.stage1, train.stage2), with the toy's parameters

The SVG is built as a string with integer coordinates, no timestamps and no randomness, so the
same code and checkpoint give the same bytes; tests/test_tutorial.py checks that the committed
files are exactly what this script writes.

    python tutorial/figures.py                        # rewrites tutorial/figures/*.svg
    python tutorial/figures.py --out /tmp/figs        # somewhere else
    python tutorial/figures.py --toy path/to/toy-tah  # another trained toy checkpoint
"""
from __future__ import annotations

import argparse
import copy
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
# itself (2: E, 2: J) and a first answer that pass 1 gets alone (2: H, with H>D and D>H; 2: D
# likewise). So fewer of its tokens iterate than on a typical row; the pipeline figure reads a
# typical one instead.
TRACE_ROW = ("J>J A>F H>D C>I I>G F>C E>E D>H G>A B>B | 2: H H 1: B B 2: I A 2: E E 2: D D 1: D H "
             "2: E E 2: I A 1: G A 1: G A 1: B B 2: G F 1: B B 1: F C 1: I G 2: J J")

ATTEND, BLOCKED, MISSING = "#2b6cb0", "#ffffff", "#d4d4d4"  # mask cell colours
ONE_PASS, TWO_PASSES = "#edf2f7", "#f6ad55"  # trace box colours
RIGHT, WRONG = "#2f855a", "#c53030"  # answer marks
PASS1, DECIDE, PASS2 = "#ebf4ff", "#fefcbf", "#feebc8"  # pipeline box colours
TRAINS, FROZEN = "#c6f6d5", "#e2e8f0"  # training-stage box colours
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


# ----------------------------------------------------------------------------- hard_first


def hard_first_example() -> tuple[torch.Tensor, ...]:
    """A batch of three rows of 8 tokens, row 1 left-padded by two: which tokens are real (valid),
    which take pass 2 (active: real and chosen), and what tah.hard_first makes of them."""
    valid = torch.ones(3, 8, dtype=torch.bool)
    valid[1, :2] = False  # row 1 is left-padded by two tokens
    chosen = torch.zeros(3, 8, dtype=torch.bool)
    chosen[0, [1, 4, 6]] = chosen[1, 5] = chosen[2, [3, 7]] = True
    active = chosen & valid  # as TaH._decide makes it: padding never iterates
    idx, q_valid = tah.hard_first(active)  # (B, T_d) each
    return valid, active, idx, q_valid


def hard_first_svg() -> str:
    valid, active, idx, q_valid = hard_first_example()
    (B, T), T_d, cell = active.shape, idx.shape[1], 34
    left, top = 70, 76
    right = left + T * cell + 150  # the packed grid
    width = right + T_d * cell + 110
    body = [text(width // 2, 22, "hard_first: each row's active tokens first, the shorter rows filled up", 13),
            text(left + T * cell // 2, top - 28, "active (B, T): who takes pass 2", 12),
            text(right + T_d * cell // 2, top - 28, "idx (B, T_d)", 12),
            text(right + T_d * cell + 50, top - 28, "q_valid", 12)]
    for t in range(T):
        body.append(text(left + t * cell + cell // 2, top - 8, f"t={t}", 10))
    for b in range(B):
        y = top + b * cell
        body.append(text(left - 10, y + 22, f"row {b}", 12, anchor="end"))
        for t in range(T):
            fill = TWO_PASSES if active[b, t] else ONE_PASS if valid[b, t] else MISSING
            body.append(rect(left + t * cell, y, cell, cell, fill, stroke=INK))
            body.append(text(left + t * cell + cell // 2, y + 22, str(t) if valid[b, t] else "pad", 12))
        for j in range(T_d):
            filler = not q_valid[b, j]
            body.append(rect(right + j * cell, y, cell, cell, MISSING if filler else TWO_PASSES, stroke=INK,
                             extra=' stroke-dasharray="3 3"' if filler else ""))
            body.append(text(right + j * cell + cell // 2, y + 22, str(int(idx[b, j])), 12))
        flags = " ".join("TF"[not v] for v in q_valid[b].tolist())  # q_valid of the row
        body.append(text(right + T_d * cell + 50, y + 22, flags, 12))
    mid_y, x1, x2 = top + B * cell // 2, left + T * cell + 14, right - 14
    body.append(f'<line x1="{x1}" y1="{mid_y}" x2="{x2}" y2="{mid_y}" stroke="{INK}" stroke-width="2"/>')
    body.append(f'<path d="M{x2 - 8},{mid_y - 5} L{x2},{mid_y} L{x2 - 8},{mid_y + 5}" fill="none" '
                f'stroke="{INK}" stroke-width="2"/>')
    body.append(text((x1 + x2) // 2, mid_y - 8, "hard_first", 12))
    y = top + B * cell + 28
    legend = [(TWO_PASSES, "", "active: a real token that takes pass 2"),
              (ONE_PASS, "", "inactive: a real token that does not"),
              (MISSING, "", "padding (valid False): never active"),
              (MISSING, ' stroke-dasharray="3 3"', "filler (q_valid False): computed and thrown away")]
    for i, (fill, dash, label) in enumerate(legend):
        body.append(rect(20, y + i * 22, 16, 16, fill, stroke=INK, extra=dash))
        body.append(text(44, y + i * 22 + 13, label, 12, anchor="start"))
    y += len(legend) * 22 + 6
    most = int(active.sum(1).argmax())
    notes = [f"idx: a stable argsort of ~active, cut to its first T_d = {T_d} columns (row {most} has the "
             "most actives);",
             "each row's actives come first, in their order, then its first inactive tokens: the fillers,",
             "padding or real tokens, which pass 2 computes and throws away (q_valid says which)"]
    for i, note in enumerate(notes):
        body.append(text(20, y + 12 + i * 18, note, 11, anchor="start"))
    return svg(width, y + 12 + len(notes) * 18 + 8, body)


# ----------------------------------------------------------------------------- Keys and KVCache


def keys_example(toy: Path = TOY) -> tuple[tah.Keys, torch.Tensor]:
    """Chapter 4's batch on the toy model: two rows of five tokens, row 1 left-padded by one, and
    positions 1 and 3 of row 0 and the last token of row 1 taking pass 2. Both passes' layers run
    through one tah.Keys without a cache, in TaH.forward's order; returns it and pass 2's mask."""
    model = tah.load(toy)
    B, T = 2, 5
    ids = torch.arange(B * T).view(B, T) + train.LETTER  # any tokens: the layout does not care
    valid = torch.tensor([[True] * 5, [False] + [True] * 4])
    active = torch.tensor([[0, 1, 0, 1, 0], [0, 0, 0, 0, 1]], dtype=torch.bool)
    positions, slots = (valid.cumsum(1) - 1).clamp(min=0), torch.arange(T).expand(B, T)
    keys, rows = tah.Keys(model.config, None, end=T), torch.arange(B)[:, None]
    idx, q_valid = tah.hard_first(active)
    with torch.no_grad():  # TaH._pass: every layer at one depth, each handing its keys to Keys
        x, _ = model._pass(model.model.embed_tokens(ids), keys.at_depth(1, positions, valid, slots))
        z1 = model.lm_head(model.model.norm(x))  # (B, T, V)
        view2 = keys.at_depth(2, positions.gather(1, idx), q_valid, slots.gather(1, idx))
        model._pass(model.soft_token(z1[rows, idx]), view2)
    return keys, view2.mask


def cache_example(toy: Path = TOY, max_len: int = 6, passes: tuple[int, ...] = (1, 2, 1, 2)):
    """The toy model decoding len(passes) tokens one at a time into a tah.KVCache of max_len slots,
    token t taking passes[t] passes. Returns the cache and, per depth, how many entries a query of
    that depth at the newest slot reads (the width of its mask from tah.Keys, on a copy), and the
    number of tokens decoded."""
    model = tah.load(toy)
    cache, end = tah.KVCache(model, batch_size=1, max_len=max_len), len(passes)
    ids = torch.arange(end)[None] + train.LETTER  # (1, end): any tokens
    with torch.no_grad():
        for t in range(end):
            model(ids[:, t:t + 1], torch.tensor([[passes[t]]]), cache=cache, start=t)
    newest = torch.tensor([[end - 1]])  # slot and position of the newest token
    reads = {d: tah.Keys(model.config, copy.deepcopy(cache), end).at_depth(
        d, newest, torch.tensor([[True]]), newest).mask.shape[-1] for d in (1, 2)}
    return cache, reads, end


def keys_cache_svg(toy: Path = TOY) -> str:
    keys, mask2 = keys_example(toy)
    cache, reads, end = cache_example(toy)
    width, left, cell = 800, 90, 40
    body = [text(width // 2, 22, "where the keys live: tah.Keys in one forward, tah.KVCache in generation", 13),
            text(20, 50, "one forward without a cache (training; chapter 4's batch): what Keys records "
                 "per depth", 12, anchor="start"),
            text(20, 68, "(the number in each entry is its position)", 11, anchor="start")]
    top, x = 118, left
    for depth, (pos, _, ok) in sorted(keys.meta.items()):  # depth-major, as the mask's columns
        n = pos.shape[1]
        body.append(text(x + n * cell // 2, top - 24, f"Keys.meta[{depth}]", 11))
        shape = f"(B, {'T' if depth == 1 else 'T_d'}) = {tuple(pos.shape)}"
        body.append(text(x + n * cell // 2, top - 8, shape, 11))
        for b in range(pos.shape[0]):
            y = top + b * cell
            for j in range(n):
                real = bool(ok[b, j])
                fill = (ONE_PASS if depth == 1 else TWO_PASSES) if real else MISSING
                dash = "" if real or depth == 1 else ' stroke-dasharray="3 3"'
                label = str(int(pos[b, j])) if real else "pad" if depth == 1 else "fill"
                body.append(rect(x + j * cell, y, cell, cell, fill, stroke=INK, extra=dash))
                body.append(text(x + j * cell + cell // 2, y + 25, label, 12))
        x += n * cell + 12
    for b in range(mask2.shape[0]):
        body.append(text(left - 10, top + b * cell + 25, f"row {b}", 12, anchor="end"))
    y = top + mask2.shape[0] * cell + 22
    lines = [f"Keys.kv[{layer}, {depth}]: keys, values (B, G, {'T' if depth == 1 else 'T_d'}, K) = "
             f"{tuple(keys.kv[layer, depth][0].shape)}" for layer, depth in sorted(keys.kv)]
    lines += ["a pass-2 query reads both depths, concatenated depth-major (Keys.update);",
              f"its mask (B, T_d, T + T_d) = {tuple(mask2.shape)}"]
    for i, line in enumerate(lines):
        body.append(text(left, y + i * 18, line, 11, anchor="start"))
    y += len(lines) * 18 + 24
    S = cache.max_len
    twice = " and ".join(str(s) for s in range(end) if cache.valid[0, S + s])
    body.append(text(20, y, "generation with tah.KVCache: per layer one buffer for every depth, depth-major",
                     12, anchor="start"))
    body.append(text(20, y + 18, f"(max_len S = {S}; {end} tokens decoded so far, tokens {twice} took pass 2)",
                     11, anchor="start"))
    top = y + 62
    depth_of = cache.depth[0].tolist()
    for d in sorted(set(depth_of)):
        first = depth_of.index(d)
        body.append(text(left + first * cell + S * cell // 2, top - 24, f"depth {d}: slots 0..{S - 1}", 11))
    for i, d in enumerate(depth_of):
        s, ok = i - (d - 1) * S, bool(cache.valid[0, i])
        fill = (ONE_PASS if d == 1 else TWO_PASSES) if ok else MISSING if s < end else "#ffffff"
        dash = ' stroke-dasharray="3 3"' if s >= end else ""
        body.append(text(left + i * cell + cell // 2, top - 6, str(i), 10))
        body.append(rect(left + i * cell, top, cell, cell, fill, stroke=INK, extra=dash))
        body.append(text(left + i * cell + cell // 2, top + 25, f"s{s}", 12))
        body.append(text(left + i * cell + cell // 2, top + cell + 18, str(int(ok)), 12))
    body.append(text(left - 10, top - 6, "index", 10, anchor="end"))
    body.append(text(left - 10, top + 25, "slot", 12, anchor="end"))
    body.append(text(left - 10, top + cell + 18, "valid", 12, anchor="end"))
    y = top + cell + 34
    for d, n in sorted(reads.items()):  # what a query of depth d at the newest slot reads: one view
        y += 20
        body.append(f'<line x1="{left}" y1="{y}" x2="{left + n * cell}" y2="{y}" stroke="{HIGHLIGHT}" '
                    'stroke-width="3"/>')
        body.append(text(left + n * cell + 8, y + 4, f"depth {d} query at slot {end - 1}: k[:, :, :{n}]", 11,
                         anchor="start"))
    y += 26
    notes = [f"KVCache.k[layer]: (B, G, max_iter * S, K) = {tuple(cache.k[0].shape)}; slot s of depth d at "
             "index (d - 1) * S + s",
             "a query reads one view, no copy: the lower depths whole, its own depth up to the newest slot;",
             "valid hides what is not there (a slot whose token did not iterate, a slot not yet written)"]
    for i, note in enumerate(notes):
        body.append(text(20, y + i * 18, note, 11, anchor="start"))
    y += len(notes) * 18 + 4
    legend = [(ONE_PASS, "", "a depth-1 entry"), (TWO_PASSES, "", "a depth-2 entry"),
              (MISSING, "", "padding; in the cache: its token did not take that pass"),
              (MISSING, ' stroke-dasharray="3 3"', "a filler's entry (q_valid False)"),
              ("#ffffff", ' stroke-dasharray="3 3"', "a slot not yet written")]
    for i, (fill, dash, label) in enumerate(legend):
        body.append(rect(20, y + i * 22, 16, 16, fill, stroke=INK, extra=dash))
        body.append(text(44, y + i * 22 + 13, label, 12, anchor="start"))
    return svg(width, y + len(legend) * 22 + 8, body)


# ----------------------------------------------------------------------------- the two training stages

STAGES = [  # chapter 6: what train.stage1 and train.stage2 do; parts: what each does to that part
    dict(title="stage 1 (train.stage1)",
         who=["who iterates: the oracle labels, a (B, T) tensor", "of passes (train.oracle_labels)"],
         parts=dict(backbone="trains", lora="trains", decider="not built yet"),
         labels=["labels: token t+1 at every scored position t"],
         loss=["loss: next-token cross-entropy on the final", "logits, z1 + z2 where the oracle says",
               "iterate, else z1 (train.lm_loss)"]),
    dict(title="stage 2 (train.stage2)",
         who=['who iterates: nobody (policy "standard"); pass 2', "never runs, the decider is only asked"],
         parts=dict(backbone="frozen", lora="frozen", decider="trains"),
         labels=["labels: the oracle labels, 1 where hard, else 0", "(prompt positions are 0)"],
         loss=["loss: BCE of the decider's logit on pass-1", "features (hidden states, top-k logits),",
               "pos_weight on the hard tokens (train.decider_loss)"]),
]
PARTS = dict(backbone="backbone: embeddings, layers, lm_head", lora="LoRA: pass 2's adapter",
             decider="decider")


def parameter_counts(toy: Path = TOY) -> dict[str, int]:
    """Parameters of each part of the trained toy model: backbone, LoRA, decider."""
    counts = dict(backbone=0, lora=0, decider=0)
    for name, p in tah.load(toy).named_parameters():
        part = "decider" if name.startswith("decider.") else "lora" if ".lora_" in name else "backbone"
        counts[part] += p.numel()
    return counts


def training_stages_svg(toy: Path = TOY) -> str:
    counts = parameter_counts(toy)
    width, col, gap, line = 860, 400, 20, 16
    fill = {"trains": TRAINS, "frozen": FROZEN, "not built yet": "#ffffff"}
    body = [text(width // 2, 22, "the two training stages: what each trains, freezes and reads as labels", 13)]
    bottom = 0
    for i, stage in enumerate(STAGES):
        x, y = 20 + i * (col + gap), 44
        body.append(text(x + col // 2, y + 14, stage["title"], 13))
        y += 26
        for key in ("who", "parts", "labels", "loss"):
            if key == "parts":
                for part, role in stage["parts"].items():
                    dash = ' stroke-dasharray="3 3"' if role == "not built yet" else ""
                    body.append(rect(x, y, col, 26, fill[role], stroke=INK, extra=dash))
                    body.append(text(x + 8, y + 17, f"{PARTS[part]} ({counts[part]:,})", 11, anchor="start"))
                    body.append(text(x + col - 8, y + 17, role, 11, anchor="end"))
                    y += 32
                continue
            rows = stage[key]
            body.append(rect(x, y, col, 10 + line * len(rows), "#ffffff", stroke=GRID))
            for j, row in enumerate(rows):
                body.append(text(x + 8, y + 18 + j * line, row, 11, anchor="start"))
            y += 16 + line * len(rows)
        bottom = max(bottom, y)
    y = bottom + 6
    legend = [(TRAINS, "", "trains: its gradients step"), (FROZEN, "", "frozen: requires_grad False"),
              ("#ffffff", ' stroke-dasharray="3 3"', "not in the model yet: train.stage2 adds it, fresh")]
    for i, (colour, dash, label) in enumerate(legend):
        body.append(rect(20, y + i * 22, 16, 16, colour, stroke=INK, extra=dash))
        body.append(text(44, y + i * 22 + 13, label, 12, anchor="start"))
    y += len(legend) * 22 + 6
    notes = ["(n): the parameters of each part in the trained toy model, tests/fixtures/toy-tah",
             "stage 2 ends by checking that the backbone and the LoRA are bitwise unchanged"]
    for i, note in enumerate(notes):
        body.append(text(20, y + 12 + i * 18, note, 11, anchor="start"))
    return svg(width, y + 12 + len(notes) * 18 + 8, body)


FIGURES = {"duo_mask.svg": lambda toy: duo_mask_svg(), "pipeline.svg": pipeline_svg,
           "token_trace.svg": token_trace_svg, "hard_first.svg": lambda toy: hard_first_svg(),
           "keys_cache.svg": keys_cache_svg, "training_stages.svg": training_stages_svg}


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
