"""Greedy decode speed of tah.generate against Hugging Face `generate`, same weights, on the CPU.

A random Qwen3 is saved with `save_pretrained` and loaded by both libraries in float32. Shapes:
  0.6b  the Qwen3-0.6B shape (hidden 1024, 16/8 heads, head_dim 128, intermediate 3072,
        vocab 151936, tied embeddings) cut to --layers layers (default 2)
  mid   hidden 512, 8 layers, 8/4 heads, head_dim 64, intermediate 1536, vocab 32000
Each side decodes --new-tokens tokens greedily after a random --prompt-len prompt, prefill
included in the time: one warmup run each, then repeats interleaved (ours, HF, ours, HF, ...)
so that a slow moment of a shared machine hits both. Prints tokens/s for both by wall time and
by this process's CPU time (steadier when other jobs share the cores), the ratio ours/HF
(target >= 1.0) and whether the greedy tokens agree.

    python bench/decode.py                          # 0.6b shape, 2 layers, 512 + 128 tokens
    python bench/decode.py --shape mid --prompt-len 16 --new-tokens 256
    python bench/decode.py --fresh-weights          # our weights copied after loading
    python bench/decode.py --profile                # where our decode spends its time
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tah  # noqa: E402


SHAPES = {
    "0.6b": dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128),
    "mid": dict(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                num_attention_heads=8, num_key_value_heads=4, head_dim=64),
}


def build(directory: str, seed: int, shape: str, layers: int):
    """A random Qwen3 saved by transformers; returns the HF model and ours, same weights."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    torch.manual_seed(seed)
    cfg = Qwen3Config(**{"num_hidden_layers": layers, **SHAPES[shape]},
                      tie_word_embeddings=True, max_position_embeddings=4096,
                      bos_token_id=None, eos_token_id=None, pad_token_id=None)
    hf = Qwen3ForCausalLM(cfg).float().eval()
    with torch.no_grad():  # spread the logits a little so greedy paths have no near-ties
        for p in hf.parameters():
            p.normal_(1.0 if p.dim() == 1 else 0.0, 0.05)
    hf.save_pretrained(directory)
    return hf, tah.load(directory, dtype=torch.float32)


def timed(fn):
    """(wall seconds, CPU seconds of this process, result). CPU time is what to compare on a
    shared machine: other jobs stretch the wall clock but not our CPU time (with 1 thread)."""
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - w, time.process_time() - c, out


def run_ours(model, prompt, n):
    return torch.stack([t for t, _ in tah.generate(model, prompt, n, policy="standard")], 1)


@torch.no_grad()
def run_hf(model, prompt, n):
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                         min_new_tokens=n, do_sample=False, use_cache=True, eos_token_id=None,
                         pad_token_id=0)
    return out[:, prompt.shape[1]:]


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=list(SHAPES), default="0.6b", help="model shape")
    ap.add_argument("--layers", type=int, default=2, help="decoder layers of the 0.6b shape")
    ap.add_argument("--new-tokens", type=int, default=128, help="tokens generated per run")
    ap.add_argument("--prompt-len", type=int, default=512, help="tokens in the (random) prompt")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per side, interleaved")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--seed", type=int, default=0, help="seed of the weights and the prompt")
    ap.add_argument("--fresh-weights", action="store_true",
                    help="copy our weights out of the buffers tah.load read them into")
    ap.add_argument("--profile", action="store_true",
                    help="print a torch.profiler table of one run of ours")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as d:
        hf, ours = build(d, args.seed, args.shape, args.layers)
    if args.fresh_weights:
        for weight in ours.parameters():
            weight.data = weight.data.clone()
    g = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(0, ours.config.vocab_size, (1, args.prompt_len), generator=g)
    n = args.new_tokens

    runs = {"ours": lambda: run_ours(ours, prompt, n), "HF": lambda: run_hf(hf, prompt, n)}
    same = torch.equal(runs["ours"](), runs["HF"]())  # also the warmup of both
    wall, cpu = {k: [] for k in runs}, {k: [] for k in runs}  # seconds per run
    for r in range(args.repeats):
        for name, run in runs.items():  # interleaved: ours, HF, ours, HF, ...
            w, c, _ = timed(run)
            wall[name].append(w)
            cpu[name].append(c)
        print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(
            f"{k} {n / wall[k][-1]:.1f} tok/s ({n / cpu[k][-1]:.1f} per CPU-s)" for k in runs),
            flush=True)
    for k in runs:  # best of the repeats: the least disturbed run
        print(f"{k:5s}: {n / min(wall[k]):7.1f} tokens/s wall, "
              f"{n / min(cpu[k]):7.1f} tokens per CPU-second")
    print(f"ratio ours/HF: {min(cpu['HF']) / min(cpu['ours']):.2f}x by CPU time "
          f"(medians {statistics.median(cpu['HF']) / statistics.median(cpu['ours']):.2f}x), "
          f"{min(wall['HF']) / min(wall['ours']):.2f}x by wall time; target >= 1.0x")
    print(f"greedy tokens identical: {same}")

    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run_ours(ours, prompt, n)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
