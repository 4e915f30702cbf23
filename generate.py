"""Generate with a TaH model and watch which tokens think twice.

The answer streams to stdout, each piece highlighted by the passes that predicted it (plain = 1,
black on yellow = 2; on a terminal without NO_COLOR); notes and stats go to stderr.

    python generate.py "What is 17 * 24?"                 # the released TaH+ 1.7B from the hub
    python generate.py --policy standard --greedy "..."   # the same weights, never iterating
    python generate.py                                    # interactive chat (Ctrl-D or 'exit')
    python generate.py --model runs/toy/tah --greedy --html trace.html \\
        "A>C B>J C>A D>E E>D F>G G>F H>I I>H J>B | 1: B J 2: A"  # open trace.html in a browser
    python generate.py --eval gsm8k.jsonl --batch-size 16 # the authors' protocol; see README
    python generate.py --model runs/toy/tah --eval tests/fixtures/toy-eval.jsonl --greedy
"""
import argparse
import html
import json
import math
import os
import re
import string
import sys
import time

import torch

import tah

HIGHLIGHT = {2: "\033[30;43m", 3: "\033[97;41m"}  # passes -> ANSI style (3 stands for 3 or more)
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
EVAL_THRESHOLD = 0.9  # the decider threshold of the authors' evaluation (training uses 0.8)


def paint(text: str, passes: int, color: bool) -> str:
    """ANSI-highlights text by passes, line by line: no background colour spills past a newline."""
    style = HIGHLIGHT.get(min(passes, 3), "") if color else ""
    return "\n".join(f"{style}{s}\033[0m" if style and s else s for s in text.split("\n"))


def prompt_ids(tok: tah.Tokenizer, messages: list[dict], raw: bool, think: bool) -> list[int]:
    """The chat format of the messages, or with raw the last message's text alone."""
    text = messages[-1]["content"] if raw else tok.chat(messages, enable_thinking=think)
    return tok.encode(text)


def stats(passes: list[int], seconds: float, policy: str) -> str:
    return (f"{len(passes)} tokens | {len(passes) / max(seconds, 1e-9):.1f} tokens/s | "
            f"{sum(p > 1 for p in passes) / max(len(passes), 1):.1%} iterated (policy {policy})")


def stream(model: tah.TaH, tok: tah.Tokenizer, ids: list[int], gen: dict, *, color: bool = False,
           trace: list | None = None) -> tuple[list[int], list[int]]:
    """Generates from prompt ids (gen, trace: tah.generate's), printing the text as it comes, then
    the stats; Ctrl-C ends early. Returns the tokens (without the stop token) and their passes."""
    if not ids:
        raise ValueError("the prompt is empty; give some text")
    tokens, passes, shown, k, t0 = [], [], "", 0, time.perf_counter()  # tokens[k:] not yet shown
    try:
        for t, p in tah.generate(model, ids, **gen, trace=trace):
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
    print(stats(passes, time.perf_counter() - t0, gen["policy"]), file=sys.stderr)
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


def write_html(path: str, tok: tah.Tokenizer, prompt: list[int], tokens: list[int], trace: list,
               header: str, threshold: float) -> None:
    """The page of one generation (trace: tah.generate's, batch of one): each token coloured by
    the passes of the position that predicted it, with a bar for that position's decider
    probability and its top-5 lists in data-top, which the script shows on hover or click."""
    at = {k: torch.cat([step[k] for step in trace], 1)[0].tolist() for k in trace[0]}  # row 0
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


def read_jsonl(path: str) -> list[tuple[str, str]]:
    """(question, answer) pairs; a GSM8K answer "... #### 42" keeps what follows ####."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            try:
                if line.strip():
                    r = json.loads(line)
                    rows.append((str(r["question"]), str(r["answer"]).split("####")[-1].strip()))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{i}: expected a JSON object with 'question' and 'answer' "
                                 f"({type(e).__name__}: {e}); fix or delete that line") from None
    if not rows:
        raise ValueError(f"{path} holds no questions; give a JSONL file with one per line")
    return rows


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


def is_correct(pred: str | None, answer: str) -> bool:
    """Exact match: normalize()d answers compared as numbers when both parse, else as text."""
    if pred is None:
        return False
    a, b = normalize(pred), normalize(answer)
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-9)
    except ValueError:
        return a == b


def scorer() -> tuple[str, callable]:
    """math-verify (the authors' scorer) when installed, else exact match: (name, judge)."""
    try:
        from math_verify import parse, verify
    except ImportError:
        return "exact-match", is_correct
    return "math-verify", lambda pred, answer: pred is not None and verify(
        parse(f"${answer.strip('$')}$"), parse(f"${pred.strip('$')}$"))


def evaluate(model, tok, rows: list, gen: dict, *, batch_size: int, raw: bool, think: bool,
             instruction: str | None, judge) -> str:
    """Answers the (question, answer) rows in left-padded batches, printing progress; returns the
    summary. The prompt is the bare question (the authors' protocol) unless given an instruction."""
    right, passes, t0 = 0, [], time.perf_counter()
    for b in range(0, len(rows), batch_size):
        batch = rows[b:b + batch_size]
        texts = [f"{q}\n{instruction}" if instruction else q for q, _ in batch]
        prompts = [prompt_ids(tok, [{"role": "user", "content": x}], raw, think) for x in texts]
        width = max(map(len, prompts))
        ids = torch.tensor([[-1] * (width - len(p)) + p for p in prompts])  # (B, T); -1 = padding
        steps = zip(*tah.generate(model, ids.clamp(min=0), valid=ids >= 0, **gen))  # tokens, passes
        for toks, iters, (_, answer) in zip(*(torch.stack(s, 1).tolist() for s in steps), batch):
            end = next((i for i, t in enumerate(toks) if t in gen["stop_ids"]), len(toks))
            right += bool(judge(extract(tok.decode(toks[:end])), answer))
            passes += iters[:end]
        n = b + len(batch)
        summary = (f"accuracy {right}/{n} = {right / n:.1%} | "
                   f"{stats(passes, time.perf_counter() - t0, gen['policy'])}")
        print(f"[{n}/{len(rows)}] {summary}", file=sys.stderr)
    return summary


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of the usage block
        raise ValueError(f"{message}; see python generate.py --help")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The flags, checked before anything loads (ValueError: what was wrong, what to do)."""
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("prompt", nargs="?", help="the prompt; without one (and without --eval) a chat starts")
    add("--model", default="nics-efc/TaH-plus-1.7B", help="hub id or local checkpoint "
        "directory (default %(default)s)")
    add("--system", help="system message (chat format only)")
    add("--no-think", action="store_true", help="turn Qwen3's thinking off (empty <think> block)")
    add("--raw", action="store_true", help="feed the prompt as plain text, without the chat format")
    add("--policy", choices=["decider", "standard", "always"],
        help="who gets pass 2: the decider (default if the model has one), nobody, everybody")
    add("--threshold", type=float,
        help=f"decider threshold (default: the checkpoint's; {EVAL_THRESHOLD} with --eval)")
    add("--temperature", type=float, default=0.6, help="sampling temperature (0 = greedy; "
        "default %(default)s)")
    add("--top-p", type=float, default=0.95, help="nucleus sampling mass (default %(default)s)")
    add("--top-k", type=int, default=20, help="sample among the k likeliest "
        "tokens (0 = all; default %(default)s)")
    add("--min-p", type=float, default=0.0, help="drop tokens under min_p x the top one")
    add("--greedy", action="store_true", help="always take the most likely token")
    add("--max-new-tokens", type=int, help="stop after this many (default 1024; 4096 with --eval)")
    add("--seed", type=int, help="seed for sampling, for reproducible answers")
    add("--device", help="cuda, mps or cpu (default: the first available, in that order)")
    add("--dtype", choices=["float32", "bfloat16", "float16"], help="bf16 on a GPU, else fp32")
    add("--color", choices=["auto", "always", "never"], default="auto", help="colour by passes")
    add("--no-color", dest="color", action="store_const", const="never", help="--color never")
    add("--html", metavar="FILE", help="also write the trace of one prompt as a web page")
    add("--eval", metavar="FILE", help="score JSONL {question, answer} rows: a reply's last "
        "\\boxed{} (else its first word) against the answer, by math-verify if installed")
    add("--instruction", nargs="?", const=INSTRUCTION, metavar="TEXT", help="--eval: append TEXT "
        f"to each question (without TEXT: \"{INSTRUCTION}\"; the authors append none)")
    add("--batch-size", type=int, default=1, help="--eval: questions generated "
        "together (default %(default)s)")
    a = p.parse_args(argv)
    for flag, ok, hint in [  # NaN fails every comparison, so it is refused too
            ("temperature", a.temperature >= 0, "give 0 or more"),
            ("top_p", 0 < a.top_p <= 1, "give a mass in (0, 1]"),
            ("top_k", a.top_k >= 0, "give 0 (all) or more"),
            ("min_p", 0 <= a.min_p < 1, "give a value in [0, 1)"),
            ("threshold", a.threshold is None or 0 <= a.threshold <= 1,
             "give a probability in [0, 1]"),
            ("max_new_tokens", a.max_new_tokens is None or a.max_new_tokens >= 1, "give 1 or more"),
            ("batch_size", a.batch_size >= 1, "give 1 or more")]:
        if not ok:
            raise ValueError(f"--{flag.replace('_', '-')} is {getattr(a, flag)}; {hint}")
    if a.html and (a.prompt is None or a.eval):
        raise ValueError("--html traces one prompt; give a prompt and no --eval")
    if a.eval and not os.path.isfile(a.eval):
        raise ValueError(f"no file {a.eval}; check --eval")
    try:  # a device this machine lacks fails now, not after the download
        torch.empty(0, device=a.device)
    except (RuntimeError, AssertionError) as e:
        why = str(e).splitlines()[0].split(". ")[0]  # torch's first sentence
        raise ValueError(f"--device {a.device} is not usable here ({why}); "
                         "leave --device out to take the first available") from None
    try:  # a page that cannot be written fails before generation, not after
        if a.html and not os.path.exists(a.html):
            open(a.html, "a").close()  # try it, and leave nothing behind
            os.remove(a.html)
        elif a.html:
            open(a.html, "a").close()
    except OSError as e:
        raise ValueError(f"cannot write --html {a.html} ({e.strerror}); give a writable path") \
            from None
    return a


def run(a: argparse.Namespace) -> int:
    """Loads the model and generates: one prompt, the eval rows, or a chat."""
    rows = read_jsonl(a.eval) if a.eval else None
    path, device = tah.resolve(a.model), a.device or tah.default_device()
    model = tah.load(path, device, getattr(torch, a.dtype) if a.dtype else None)
    tok = tah.load_tokenizer(path)
    if not tok.has_chat and not a.raw:
        print("note: this tokenizer has no chat tokens, so prompts go in raw", file=sys.stderr)
    if model.decider is None and a.policy is None:
        print("note: this model has no decider, so it runs as plain Qwen3", file=sys.stderr)
    raw, think = a.raw or not tok.has_chat, not a.no_think
    policy = a.policy or ("standard" if model.decider is None else "decider")
    default = EVAL_THRESHOLD if rows else model.tah.threshold  # the authors evaluate at 0.9
    threshold = default if a.threshold is None else a.threshold
    rng = None if a.seed is None else torch.Generator(device).manual_seed(a.seed)
    gen = dict(max_new_tokens=a.max_new_tokens or (4096 if rows else 1024), policy=policy,
               stop_ids=tok.stop_ids, threshold=threshold, generator=rng, top_k=a.top_k,
               temperature=0.0 if a.greedy else a.temperature, top_p=a.top_p, min_p=a.min_p)
    tty = sys.stdout.isatty() and "NO_COLOR" not in os.environ
    color = a.color == "always" or (a.color == "auto" and tty)
    if color and not rows:
        print("colours: " + ", ".join(paint(f"{d} pass" + "es" * (d > 1), d, True)
                                      for d in range(1, model.tah.max_iter + 1)), file=sys.stderr)
    messages = [{"role": "system", "content": a.system}] if a.system else []
    if rows:
        name, judge = scorer()
        print(f"note: scoring with {name}" + " (pip install '.[eval]' for math-verify, the "
              "authors' scorer)" * (name != "math-verify"), file=sys.stderr)
        summary = evaluate(model, tok, rows, gen, batch_size=a.batch_size, raw=raw, think=think,
                           instruction=a.instruction, judge=judge)
        print(f"{a.eval}: {summary} | scorer {name} | threshold {threshold:g} | "
              f"max {gen['max_new_tokens']} new tokens")
    elif a.prompt is not None:
        ids = prompt_ids(tok, messages + [{"role": "user", "content": a.prompt}], raw, think)
        trace, t0 = ([] if a.html else None), time.perf_counter()
        tokens, passes = stream(model, tok, ids, gen, color=color, trace=trace)
        if a.html:
            header = f"{a.model} | {stats(passes, time.perf_counter() - t0, policy)} | " \
                     f"threshold {threshold:g}"
            write_html(a.html, tok, ids, tokens, trace, header, threshold)
            print(f"wrote {a.html}", file=sys.stderr)
    else:
        chat(model, tok, messages, gen, raw=raw, think=think, color=color)
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status (0 done, 2 a user error, 130 interrupted)."""
    try:
        return run(parse_args(argv))
    except (OSError, ValueError) as e:  # what a user can fix, in one line; bugs keep a traceback
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
