"""What does thinking twice cost? A CPU benchmark of the TaH forward and of cached decoding.

A random mid-size Qwen3 (fp32, no grad) runs with a fraction p of tokens iterating (a random
oracle policy), against the standard forward (nobody iterates). Pass 2 runs only on the gathered
iterating tokens, so the targets are:
  forward (prefill) time   <= (1 + p) x 1.15 x standard
  decode tokens/s          >= 0.95 x standard / (1 + p)  (a fraction p of decode steps iterate)
Runs are interleaved (standard, p=0, p=0.1, ... in every repeat) and medians compared.

  python bench/tah_cost.py                     # hidden 512, 8 layers, vocab 32000, T = 512
  python bench/tah_cost.py --tiny              # seconds, to check that the script runs
  python bench/tah_cost.py --threads 2 --repeats 9
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tah  # noqa: E402


def build(args) -> tah.TaH:
    config = tah.Qwen3Config(vocab_size=args.vocab, hidden_size=args.hidden,
                             intermediate_size=3 * args.hidden, num_hidden_layers=args.layers,
                             num_attention_heads=args.hidden // 64,
                             num_key_value_heads=max(1, args.hidden // 128), head_dim=64,
                             max_position_embeddings=args.seq + args.decode + 8,
                             torch_dtype="float32")
    tah_config = tah.TaHConfig(lora_r=16, lora_alpha=32, lora_dropout=0.0)  # the oracle decides
    torch.manual_seed(0)
    model = tah.TaH(config, tah_config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:  # a live adapter, as after training
                p.normal_(std=0.02)
    return model.eval()


def policy(shape, p: float, seed: int) -> torch.Tensor:
    """Passes per token: exactly round(p * n) of the n tokens get 2, chosen at random."""
    g = torch.Generator().manual_seed(seed)
    n = shape[0] * shape[1]
    passes = torch.ones(n, dtype=torch.long)
    passes[torch.randperm(n, generator=g)[:round(p * n)]] = 2
    return passes.view(shape)


CLOCK = time.perf_counter  # or time.process_time (--clock cpu)


@torch.no_grad()
def time_forward(model, ids, pol) -> float:
    t0 = CLOCK()
    model(ids, pol)
    return CLOCK() - t0


@torch.no_grad()
def time_decode(model, prompt, steps: int, pol) -> float:
    """Seconds for `steps` greedy decode steps after a prefill (not timed) of the prompt, on the
    prompt's device (on a GPU the clock waits for its work). pol is "standard" or a (B, steps)
    tensor of passes for the decode steps."""
    B, T = prompt.shape
    cache = tah.KVCache(model, B, T + steps)
    out = model(prompt, "standard", cache=cache, logits="last")
    tok = out.logits[:, -1].argmax(-1)
    sync = torch.cuda.synchronize if prompt.is_cuda else (lambda: None)
    sync()
    t0 = CLOCK()
    for s in range(steps):
        step = pol if isinstance(pol, str) else pol[:, s:s + 1]
        pos = torch.full((B, 1), T + s, device=prompt.device)
        out = model(tok[:, None], step, positions=pos, cache=cache, start=T + s)
        tok = out.logits[:, -1].argmax(-1)
    sync()
    return CLOCK() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512, help="hidden size (heads of 64 dims)")
    ap.add_argument("--layers", type=int, default=8, help="decoder layers")
    ap.add_argument("--vocab", type=int, default=32000, help="vocabulary size")
    ap.add_argument("--seq", type=int, default=512, help="tokens in the forward / the decode prompt")
    ap.add_argument("--decode", type=int, default=64, help="decode steps timed per run")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved repeats; medians are compared")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.1, 0.5, 1.0],
                    help="fractions p of iterating tokens / decode steps")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="wall time, or this process's CPU time (steadier on a busy machine, "
                    "with --threads 1)")
    ap.add_argument("--tiny", action="store_true",
                    help="a tiny model and few repeats, to test the script")
    args = ap.parse_args()
    if args.tiny:
        args.hidden, args.layers, args.vocab = 128, 2, 1000
        args.seq, args.decode, args.repeats = 64, 8, 2
    torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    model = build(args)
    print(f"model: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, LoRA r 16; "
          f"T = {args.seq}, {args.decode} decode steps, {args.threads} thread(s), fp32 CPU, "
          f"{args.clock} clock")
    ids = torch.randint(0, args.vocab, (1, args.seq), generator=torch.Generator().manual_seed(1))
    names = ["standard"] + [f"p={p:g}" for p in args.fractions]
    fwd_pol = ["standard"] + [policy((1, args.seq), p, 2) for p in args.fractions]
    dec_pol = ["standard"] + [policy((1, args.decode), p, 3) for p in args.fractions]
    time_forward(model, ids, fwd_pol[-1])  # warm up
    time_decode(model, ids[:, :16], 4, dec_pol[-1])
    fwd = {n: [] for n in names}
    dec = {n: [] for n in names}
    for r in range(args.repeats):
        for n, fp, dp in zip(names, fwd_pol, dec_pol):
            fwd[n].append(time_forward(model, ids, fp))
            dec[n].append(time_decode(model, ids, args.decode, dp))
        print(f"repeat {r + 1}/{args.repeats} done", flush=True)
    f0, d0 = statistics.median(fwd["standard"]), statistics.median(dec["standard"])
    print(f"\nforward, T = {args.seq}: standard {f0 * 1e3:.1f} ms")
    print(f"{'':10}{'ms':>9}{'ratio':>8}{'target <=':>11}")
    ok = True
    for n, p in zip(names[1:], args.fractions):
        t = statistics.median(fwd[n])
        ratio, target = t / f0, (1 + p) * 1.15
        ok &= ratio <= target
        print(f"{n:10}{t * 1e3:9.1f}{ratio:8.3f}{target:11.3f}  "
              f"{'ok' if ratio <= target else 'MISSED'}")
    print(f"\ndecode after a {args.seq}-token prompt: standard {args.decode / d0:.1f} tokens/s")
    print(f"{'':10}{'tok/s':>9}{'ratio':>8}{'target >=':>11}")
    for n, p in zip(names[1:], args.fractions):
        speed = args.decode / statistics.median(dec[n])
        ratio, target = speed / (args.decode / d0), 0.95 / (1 + p)
        ok &= ratio >= target
        print(f"{n:10}{speed:9.1f}{ratio:8.3f}{target:11.3f}  "
              f"{'ok' if ratio >= target else 'MISSED'}")
    print("\nall targets met" if ok else "\nsome targets MISSED")


if __name__ == "__main__":
    main()
