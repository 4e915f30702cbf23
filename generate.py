"""Generate with a TaH model and watch which tokens think twice.

The answer streams to stdout, each piece highlighted by the passes that predicted it (plain = 1, black on
yellow = 2; on a terminal without NO_COLOR); the legend, notes and stats (tokens/s, % iterated) go to stderr.

    python generate.py "What is 17 * 24?"                 # the released TaH+ 1.7B from the hub
    python generate.py --model runs/toy/tah --greedy "A>C B>J C>A D>E E>D F>G G>F H>I I>H J>B | 2: A"
    python generate.py --policy standard --greedy "..."   # the same weights, never iterating
    python generate.py                                    # interactive chat (Ctrl-D or 'exit')
    python generate.py --eval gsm8k.jsonl --greedy --batch-size 16 --max-new-tokens 4096
"""
import argparse
import json
import math
import os
import re
import sys
import time

import torch

import tah

HIGHLIGHT = {2: "\033[30;43m", 3: "\033[97;41m"}  # passes -> ANSI style (3 stands for 3 or more)
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def paint(text: str, passes: int, color: bool) -> str:
    """ANSI-highlights text by passes, line by line, so no background colour spills past a newline."""
    style = HIGHLIGHT.get(min(passes, 3), "") if color else ""
    return "\n".join(f"{style}{s}\033[0m" if style and s else s for s in text.split("\n"))


def prompt_ids(tok: tah.Tokenizer, messages: list[dict], args: argparse.Namespace) -> list[int]:
    return tok.encode(messages[-1]["content"] if args.raw else tok.chat(messages, enable_thinking=not args.no_think))


def stats(passes: list[int], seconds: float, policy: str) -> str:
    return (f"{len(passes)} tokens | {len(passes) / max(seconds, 1e-9):.1f} tokens/s | "
            f"{sum(p > 1 for p in passes) / max(len(passes), 1):.1%} iterated (policy {policy})")


def stream(model: tah.TaH, tok: tah.Tokenizer, ids: list[int], gen: dict, color: bool = False) -> tuple:
    """Generates from prompt ids (gen: tah.generate's keyword arguments), printing the text as it comes, then
    the stats line; Ctrl-C ends early. Returns the tokens (without the stop token) and their passes."""
    if not ids:
        raise ValueError("the prompt is empty; give some text")
    tokens, passes, shown, k, t0 = [], [], "", 0, time.perf_counter()  # tokens[k:] not yet shown
    try:
        for t, p in tah.generate(model, ids, **gen):
            if int(t) in gen["stop_ids"]:
                break
            tokens.append(int(t))
            passes.append(int(p))
            # decode all so far (tokens may join with spaces); a split character is U+FFFD until complete
            text = tok.decode(tokens).rstrip("\ufffd")
            if len(text) > len(shown):
                print(paint(text[len(shown):], max(passes[k:]), color), end="", flush=True)
                shown, k = text, len(tokens)
    except KeyboardInterrupt:
        print(" [stopped]", end="", file=sys.stderr)
    print(paint(tok.decode(tokens)[len(shown):], max(passes[k:], default=1), color))  # bytes left over
    print(stats(passes, time.perf_counter() - t0, gen["policy"]), file=sys.stderr)
    return tokens, passes


def chat(model: tah.TaH, tok: tah.Tokenizer, history: list, gen: dict, args: argparse.Namespace, color: bool):
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
            tokens, _ = stream(model, tok, prompt_ids(tok, messages, args), gen, color)
            history = messages + [{"role": "assistant", "content": tok.decode(tokens)}]
        except ValueError as e:  # an empty line, or a conversation longer than the context
            print(f"error: {e}", file=sys.stderr)


def read_jsonl(path: str) -> list[tuple[str, str]]:
    """(question, answer) pairs; a GSM8K answer "... #### 42" keeps what follows ####."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            try:
                if line.strip():
                    r = json.loads(line)
                    rows.append((str(r["question"]), str(r["answer"]).split("####")[-1]))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{i}: expected a JSON object with 'question' and 'answer' "
                                 f"({type(e).__name__}: {e}); fix or delete that line") from None
    if not rows:
        raise ValueError(f"{path} holds no questions")
    return rows


def last_boxed(text: str) -> str | None:
    """The contents of the last \\boxed{...}, braces matched; None if there is none."""
    start, depth = text.rfind("\\boxed{"), 0
    for i in range(start + 6, len(text)) if start >= 0 else ():
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start + 7:i]
    return None


def normalize(s: str) -> str:
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", s)  # \\text{B} -> B
    s = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", s)  # 1,234 -> 1234, but the list 1,2 stays
    return re.sub(r"\s|\$|\\!|\\,", "", s).replace("\\dfrac", "\\frac").rstrip(".")


def is_correct(pred: str | None, answer: str) -> bool:
    """normalize()d answers compared as numbers when both parse as numbers, else as text."""
    if pred is None:
        return False
    a, b = normalize(pred), normalize(answer)
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-9)
    except ValueError:
        return a == b


def evaluate(model: tah.TaH, tok: tah.Tokenizer, rows: list, gen: dict, args: argparse.Namespace) -> str:
    """Answers the (question, answer) rows in left-padded batches, printing progress; returns the summary."""
    right, passes, t0 = 0, [], time.perf_counter()
    for b in range(0, len(rows), args.batch_size):
        batch = rows[b:b + args.batch_size]
        prompts = [prompt_ids(tok, [{"role": "user", "content": f"{q}\n{INSTRUCTION}"}], args) for q, _ in batch]
        ids = torch.tensor([[-1] * (max(map(len, prompts)) - len(p)) + p for p in prompts])  # (B, T); -1 = pad
        steps = zip(*tah.generate(model, ids.clamp(min=0), valid=ids >= 0, **gen))  # tokens, passes: (B,) each
        for toks, iters, (_, answer) in zip(*(torch.stack(s, 1).tolist() for s in steps), batch):
            end = next((i for i, t in enumerate(toks) if t in gen["stop_ids"]), len(toks))  # its first stop
            right += is_correct(last_boxed(tok.decode(toks[:end])), answer)
            passes += iters[:end]
        n = b + len(batch)
        summary = f"accuracy {right}/{n} = {right / n:.1%} | {stats(passes, time.perf_counter() - t0, gen['policy'])}"
        print(f"[{n}/{len(rows)}] {summary}", file=sys.stderr)
    return summary


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status (0 done, 1 a user error, 130 interrupted)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt", nargs="?", help="the prompt; without one (and without --eval) a chat starts")
    p.add_argument("--model", default="nics-efc/TaH-plus-1.7B", help="hub id or local checkpoint directory")
    p.add_argument("--system", help="system message (chat format only)")
    p.add_argument("--no-think", action="store_true", help="turn Qwen3's thinking off (empty <think> block)")
    p.add_argument("--raw", action="store_true", help="feed the prompt as plain text, without the chat format")
    p.add_argument("--policy", choices=["decider", "standard", "always"],
                   help="who gets pass 2: the decider (default if the model has one), nobody, everybody")
    p.add_argument("--threshold", type=float, help="decider threshold (default: the checkpoint's)")
    p.add_argument("--temperature", type=float, default=0.6, help="sampling temperature (0 = greedy)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass")
    p.add_argument("--top-k", type=int, default=20, help="sample among the k likeliest tokens (0 = all)")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens under min_p x the top one")
    p.add_argument("--greedy", action="store_true", help="always take the most likely token")
    p.add_argument("--max-new-tokens", type=int, default=1024, help="stop after this many (paper: 4096)")
    p.add_argument("--seed", type=int, help="seed for sampling, for reproducible answers")
    p.add_argument("--device", help="cuda, mps or cpu (default: the first available, in that order)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="bfloat16 on a GPU, else float32")
    p.add_argument("--color", choices=["auto", "always", "never"], default="auto", help="colour by passes")
    p.add_argument("--no-color", dest="color", action="store_const", const="never", help="same as --color never")
    p.add_argument("--eval", metavar="FILE", help="score \\boxed{} answers to JSONL questions")
    p.add_argument("--batch-size", type=int, default=1, help="--eval: questions generated together")
    args = p.parse_args(argv)
    if args.top_k < 0 or not 0 <= args.min_p < 1 or args.max_new_tokens < 1 or args.batch_size < 1:
        p.error("--top-k must be >= 0, --min-p in [0, 1), --max-new-tokens and --batch-size >= 1")
    device = args.device or tah.default_device()
    tty = sys.stdout.isatty() and "NO_COLOR" not in os.environ
    color = args.color == "always" or (args.color == "auto" and tty)
    try:  # user errors (no such model, offline, bad JSONL, prompt too long) say what to do, in one line
        rows = read_jsonl(args.eval) if args.eval else None
        path = tah.resolve(args.model)
        model = tah.load(path, device, getattr(torch, args.dtype) if args.dtype else None)
        tok = tah.load_tokenizer(path)
        if not tok.has_chat and not args.raw:
            print("note: this tokenizer has no chat tokens, so prompts go in as raw text", file=sys.stderr)
        if model.decider is None and args.policy is None:
            print("note: this model has no decider, so it runs as plain Qwen3 (policy standard)", file=sys.stderr)
        args.raw = args.raw or not tok.has_chat
        policy = args.policy or ("standard" if model.decider is None else "decider")
        rng = None if args.seed is None else torch.Generator(device).manual_seed(args.seed)
        gen = dict(max_new_tokens=args.max_new_tokens, policy=policy, stop_ids=tok.stop_ids, threshold=args.threshold,
                   temperature=0.0 if args.greedy else args.temperature, top_k=args.top_k, top_p=args.top_p,
                   min_p=args.min_p, generator=rng)
        if color and not rows:
            print("colours: " + ", ".join(paint(f"{d} pass" + "es" * (d > 1), d, True)
                                          for d in range(1, model.tah.max_iter + 1)), file=sys.stderr)
        system = [{"role": "system", "content": args.system}] if args.system else []
        if rows:
            print(evaluate(model, tok, rows, gen, args))
        elif args.prompt is not None:
            stream(model, tok, prompt_ids(tok, system + [{"role": "user", "content": args.prompt}], args), gen, color)
        else:
            chat(model, tok, system, gen, args, color)
        return 0
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
