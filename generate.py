"""Generate with a TaH model and watch which tokens think twice.

The answer streams to stdout, each piece highlighted by the passes that predicted it (plain = 1,
black on yellow = 2; on a terminal without NO_COLOR); notes and stats go to stderr.

    python generate.py "What is 17 * 24?"                 # the released TaH+ 1.7B from the hub
    python generate.py --policy standard --greedy "..."   # the same weights, never iterating
    python generate.py                                    # interactive chat (Ctrl-D or 'exit')
    python generate.py --model runs/toy/tah --greedy --html trace.html \\
        "A>C B>J C>A D>E E>D F>G G>F H>I I>H J>B | 1: B J 2: A"  # open trace.html in a browser
"""
import argparse
import contextlib
import html
import json
import math
import os
import string
import sys
import time

import torch

import tah

def paint(text: str, passes: int, color: bool) -> str:
    """ANSI-highlights text by passes, line by line: no background colour spills past a newline."""
    style = {2: "\033[30;43m", 3: "\033[97;41m"}.get(min(passes, 3), "") if color else ""  # 3+
    return "\n".join(f"{style}{s}\033[0m" if style and s else s for s in text.split("\n"))


def prompt_ids(tok: tah.Tokenizer, messages: list[dict], raw: bool, think: bool) -> list[int]:
    """The chat format of the messages, or with raw the last message's text alone."""
    text = messages[-1]["content"] if raw else tok.chat(messages, enable_thinking=think)
    return tok.encode(text)


def stream(model: tah.TaH, tok: tah.Tokenizer, ids: list[int], gen: dict, *,
           color: bool = False) -> tuple[list[int], list[int]]:
    """Generates from prompt ids (gen: tah.generate's keywords), printing the text as it comes, then
    the stats; Ctrl-C ends early. Returns the tokens (without the stop token) and their passes."""
    if not ids:
        raise ValueError("the prompt is empty; give some text")
    tokens, passes, shown, k, t0 = [], [], "", 0, time.perf_counter()  # tokens[k:] not yet shown
    try:
        for t, p in tah.generate(model, ids, **gen):
            if int(t) in gen["stop_ids"]:
                break
            tokens.append(int(t))
            passes.append(int(p))
            # decode all so far (tokens may join with spaces); a split character is U+FFFD for now
            text = tok.decode(tokens).rstrip("\ufffd")
            if len(text) > len(shown):
                print(paint(text[len(shown):], max(passes[k:]), color), end="", flush=True)
                shown, k = text, len(tokens)
    except KeyboardInterrupt:
        print(" [stopped]", end="", file=sys.stderr)
    print(paint(tok.decode(tokens)[len(shown):], max(passes[k:], default=1), color))  # the rest
    n, iterated, seconds = len(tokens), sum(p > 1 for p in passes), time.perf_counter() - t0
    print(f"{n} tokens | {n / max(seconds, 1e-9):.1f} tokens/s | {iterated / max(n, 1):.1%} "
          f"iterated (policy {gen['policy']})", file=sys.stderr)
    return tokens, passes


def chat(model, tok, history: list, gen: dict, *, raw: bool, think: bool, color: bool) -> None:
    """Multi-turn chat. The history keeps each answer as generated (the chat format then drops the
    <think> blocks of earlier turns); a raw prompt is the last line alone."""
    print("chat: Ctrl-D or 'exit' leaves; Ctrl-C stops an answer", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):  # Ctrl-D, or Ctrl-C while no answer is running
            return print()
        if line.strip() in ("exit", "quit"):
            return
        messages = history + [{"role": "user", "content": line}]
        try:
            tokens, _ = stream(model, tok, prompt_ids(tok, messages, raw, think), gen, color=color)
            history = messages + [{"role": "assistant", "content": tok.decode(tokens)}]
        except ValueError as e:  # an empty line, or a conversation longer than the context
            print(f"error: {e}", file=sys.stderr)


@torch.no_grad()
def trace(model: tah.TaH, ids: list[int], policy: str, threshold: float) -> dict[str, list]:
    """The numbers behind each position of ids, from ONE forward over them (it equals cached
    decoding; tests/test_tah.py checks that): passes, the decider's probability (NaN unless the
    policy is "decider"), the top 5 of pass 1's and the final softmax, the soft token's weights."""
    x = torch.tensor([ids], device=model.lm_head.weight.device)  # (1, T)
    out = model(x, policy, threshold=threshold, output_hidden_states=True)
    z1 = model.lm_head(out.hidden_states[-1])[0].float()  # (T, V) pass 1's logits: index L = norm
    soft = z1.topk(model.tah.input_topk)  # (T, k): the soft token mixes these embedding rows
    prob = torch.sigmoid(out.continue_logit[0].float()) if policy == "decider" \
        else torch.full(x.shape[1:], float("nan"))
    at = {"passes": out.iter_count[0], "prob": prob, "soft_ids": soft.indices[:, :5],
          "soft_weights": soft.values.softmax(-1)[:, :5]}  # the largest weights: largest logits
    for name, z in (("pass1", z1), ("final", out.logits[0].float())):
        v, i = z.topk(5)  # (T, 5) logits and ids; their softmax probabilities: exp(z - logsumexp z)
        at[name + "_ids"], at[name + "_probs"] = i, (v - z.logsumexp(-1, keepdim=True)).exp()
    return {name: v.tolist() for name, v in at.items()}


TOPS = {"pass 1 predicted": ("pass1_ids", "pass1_probs"),  # the trace's top-5 lists, by heading
        "final (+ pass 2)": ("final_ids", "final_probs"),
        "soft token mixed": ("soft_ids", "soft_weights")}
PAGE = string.Template("""<!doctype html><meta charset="utf-8"><title>TaH trace</title><style>
body{font:15px/2.4 monospace;margin:1.5em;max-width:72em} h1{font-size:15px} h2{font-size:14px;
border-top:2px solid #888;margin:1em 0 0} .t{position:relative;padding:1px 3px 5px;margin:1px;
white-space:pre;background:#e4e4e4;cursor:pointer} .p2{background:#fd4} .p3{background:#d33;
color:#fff} .t b{position:absolute;left:0;bottom:0;height:3px;background:#25c}
.t[data-prob]::after{content:"";position:absolute;left:var(--thr);bottom:0;height:7px;
border-left:1px solid #000} #info{position:sticky;top:0;background:#f4f4ff;padding:.5em;
line-height:1.3;border:1px solid #99c}</style>
<body style="--thr:$percent" data-threshold="$threshold"><h1>$header</h1><p>Each token is coloured
by the passes of the position that predicted it (grey 1, yellow 2, red 3+); the bar under it is
that position's decider probability, the tick the threshold. Hover over or click a token.</p>
<pre id="info"></pre><h2>prompt</h2><div>$prompt</div><h2>answer</h2><div id="answer">$answer</div>
<script>
function show(e) {  // the token's numbers, then its three top-5 lists side by side
  const t = e.target?.closest(".t[data-top]");
  if (!t) return;
  const cols = Object.entries(JSON.parse(t.dataset.top)).map(([name, rows]) => [name, ...rows.map(
    ([, w, p]) => (100 * p).toFixed(1).padStart(5) + "% " + JSON.stringify(w))]);
  document.getElementById("info").textContent = "token " + JSON.stringify(t.textContent) +
    ": predicted with " + t.dataset.passes + " passes, decider probability " + t.dataset.prob +
    " (threshold " + document.body.dataset.threshold + ")\\n\\n" +
    cols[0].map((_, r) => cols.map(c => c[r].padEnd(28)).join(" ")).join("\\n");
}
document.onmouseover = document.onclick = show;
show({target: document.querySelector("#answer .t")});
</script></body>
""")


def write_html(path: str, tok: tah.Tokenizer, prompt: list[int], tokens: list[int], at: dict,
               header: str, threshold: float) -> None:
    """The page of one generation (at: trace() of prompt + tokens): each token coloured by the
    passes that predicted it, a bar for the decider's probability, its top-5 lists on hover."""
    spans = [f'<span class="t">{html.escape(tok.decode(prompt[:1]))}</span>']  # none predicted it
    for j, t in enumerate(prompt[1:] + tokens):  # token j + 1, predicted by position j
        p, q = at["passes"][j], at["prob"][j]
        top = {name: [[w, tok.decode([w]), round(x, 4)] for w, x in zip(at[ws][j], at[xs][j])]
               for name, (ws, xs) in TOPS.items()}
        bar = "" if math.isnan(q) else f'<b style="width:{q:.1%}"></b>'
        spans.append(f'<span class="t p{min(p, 3)}" data-passes="{p}" data-prob="{q:.4f}" data-top='
                     f'"{html.escape(json.dumps(top))}">{html.escape(tok.decode([t]))}{bar}</span>')
    with open(path, "w", encoding="utf-8") as f:
        f.write(PAGE.substitute(percent=f"{threshold:.1%}", threshold=f"{threshold:g}",
                                header=html.escape(header), prompt="".join(spans[:len(prompt)]),
                                answer="".join(spans[len(prompt):])))


def bounded(kind: type, ok, want: str):
    """An argparse type= function: the text read as kind if ok(value), else one line of error."""
    def parse(text: str):
        with contextlib.suppress(ValueError):  # not a number, or not one of kind
            if ok(value := kind(text)):  # NaN fails every comparison, so it is refused too
                return value
        raise argparse.ArgumentTypeError(f"{text} is not {want}")
    return parse


non_negative = bounded(float, lambda v: v >= 0, "a number >= 0")
probability = bounded(float, lambda v: 0 <= v <= 1, "a probability in [0, 1]")
mass = bounded(float, lambda v: 0 < v <= 1, "a mass in (0, 1]")
count = bounded(int, lambda v: v >= 0, "an integer >= 0")
positive = bounded(int, lambda v: v >= 1, "an integer >= 1")


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of the usage block
        raise ValueError(f"{message}; see {self.prog} --help")


def model_flags(p: argparse.ArgumentParser, *, threshold: float | None, length: int) -> None:
    """The flags that load a model and sample from it, which bench/eval.py shares."""
    add = p.add_argument
    add("--model", default="nics-efc/TaH-plus-1.7B", help="hub id or local checkpoint "
        "directory (default %(default)s)")
    add("--system", help="system message (chat format only)")
    add("--no-think", action="store_true", help="turn Qwen3's thinking off (empty <think> block)")
    add("--raw", action="store_true", help="feed the prompt as plain text, without the chat format")
    add("--policy", choices=["decider", "standard", "always"],
        help="who gets pass 2: the decider (default if the model has one), nobody, everybody")
    add("--threshold", type=probability, default=threshold, help="decider threshold in [0, 1] "
        "(default: " + ("the checkpoint's)" if threshold is None else "%(default)s)"))
    add("--temperature", type=non_negative, default=0.6, help="sampling temperature (0 = greedy; "
        "default %(default)s)")
    add("--top-p", type=mass, default=0.95, help="nucleus sampling mass (default %(default)s)")
    add("--top-k", type=count, default=20, help="k likeliest tokens only (0 = all; default "
        "%(default)s)")
    add("--min-p", type=probability, default=0.0, help="drop tokens under min_p x the top one")
    add("--greedy", action="store_true", help="always take the most likely token")
    add("--max-new-tokens", type=positive, default=length, help="answer length cap (default "
        "%(default)s)")
    add("--seed", type=int, help="seed for sampling, for reproducible answers")
    add("--device", help="cuda, mps or cpu (default: the first of them this machine has)")
    add("--dtype", choices=["float32", "bfloat16", "float16"], help="bf16 on a GPU, else fp32")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The flags, checked before anything loads (ValueError: what was wrong, what to do)."""
    p = Parser(prog="python generate.py", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("prompt", nargs="?", help="the prompt; without one a chat starts")
    model_flags(p, threshold=None, length=1024)
    add("--color", choices=["auto", "always", "never"], default="auto", help="colour by passes")
    add("--html", metavar="FILE", help="also write the trace of the answer as a web page")
    a = p.parse_args(argv)
    if a.html and a.prompt is None:
        raise ValueError("--html traces one prompt; give a prompt")
    try:  # a page that cannot be written fails before generation, not after
        existed = os.path.exists(a.html or "")
        if a.html:
            open(a.html, "a").close()
        if a.html and not existed:
            os.remove(a.html)  # tried it, and left nothing behind
    except OSError as e:
        raise ValueError(f"cannot write --html {a.html} ({e.strerror}); fix the path") from None
    return a


def setup(a: argparse.Namespace) -> tuple:
    """(model, tokenizer, tah.generate's keywords, raw, think) as the flags say; notes on stderr."""
    try:  # a device this machine lacks fails now, not after the download
        torch.empty(0, device=a.device)
    except (RuntimeError, AssertionError) as e:
        raise ValueError(f"--device {a.device} is not usable here ({str(e).split('. ')[0]}); "
                         "leave --device out to take the first available") from None
    path, device = tah.resolve(a.model), a.device or tah.default_device()
    model = tah.load(path, device, getattr(torch, a.dtype) if a.dtype else None)
    tok = tah.load_tokenizer(path)
    if not tok.has_chat and not a.raw:
        print("note: this tokenizer has no chat tokens, so prompts go in raw", file=sys.stderr)
    if model.decider is None and a.policy is None:
        print("note: this model has no decider, so it runs as plain Qwen3", file=sys.stderr)
    rng = None if a.seed is None else torch.Generator(device).manual_seed(a.seed)
    gen = dict(max_new_tokens=a.max_new_tokens, stop_ids=tok.stop_ids, generator=rng,
               policy=a.policy or ("standard" if model.decider is None else "decider"),
               threshold=model.tah.threshold if a.threshold is None else a.threshold, top_k=a.top_k,
               temperature=0.0 if a.greedy else a.temperature, top_p=a.top_p, min_p=a.min_p)
    return model, tok, gen, a.raw or not tok.has_chat, not a.no_think


def run(a: argparse.Namespace) -> int:
    """Loads the model and generates: one prompt (and its page), or a chat."""
    model, tok, gen, raw, think = setup(a)
    tty = sys.stdout.isatty() and "NO_COLOR" not in os.environ
    color = a.color == "always" or (a.color == "auto" and tty)
    if color:
        print("colours: " + ", ".join(paint(f"{d} pass" + "es" * (d > 1), d, True)
                                      for d in range(1, model.tah.max_iter + 1)), file=sys.stderr)
    messages = [{"role": "system", "content": a.system}] if a.system else []
    if a.prompt is None:
        chat(model, tok, messages, gen, raw=raw, think=think, color=color)
        return 0
    ids = prompt_ids(tok, messages + [{"role": "user", "content": a.prompt}], raw, think)
    tokens, _ = stream(model, tok, ids, gen, color=color)
    if a.html:
        header = f"{a.model} | policy {gen['policy']} | threshold {gen['threshold']:g}"
        at = trace(model, ids + tokens, gen["policy"], gen["threshold"])
        write_html(a.html, tok, ids, tokens, at, header, gen["threshold"])
        print(f"wrote {a.html}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None, parse=parse_args, go=run) -> int:
    """The command line (also bench/eval.py's): exit status 0 done, 2 a user error, 130 stopped."""
    try:
        return go(parse(argv))
    except (OSError, ValueError) as e:  # what a user can fix, in one line; bugs keep a traceback
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
