"""Batched generation throughput (what `bench/eval.py --batch-size` does): tokens/s at several batch
sizes on one random mid-size model (hidden 512, 8 layers, 8/4 heads, head_dim 64, vocab 32000,
fp32, CPU), greedy, after random prompts of different lengths (left-padded).

Two settings, interleaved over the batch sizes in every repeat, medians compared (CPU time of
this process, steadier than the wall clock on a shared machine):
  run    every row generates --new-tokens tokens
  stop   every row but the first emits a stop id at once (the stop ids are their first tokens,
         leaving out any token the first row makes): finished rows leave the batch, so the
         run should cost about what the first row costs alone

    python bench/batch.py                     # batches 1, 4, 16; 32 new tokens; 64-token prompts
    python bench/batch.py --batches 1 16 --new-tokens 64
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tah  # noqa: E402


def build(vocab: int) -> tah.TaH:
    config = tah.Qwen3Config(vocab_size=vocab, hidden_size=512, intermediate_size=1536,
                             num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                             head_dim=64, torch_dtype="float32")
    torch.manual_seed(0)
    return tah.TaH(config).eval()


def prompts(batch: int, length: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts of lengths length/2..length, left-padded: ids and valid (B, T)."""
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    lengths = torch.randint(length // 2, length + 1, (batch,), generator=g)
    valid = torch.arange(length)[None] >= length - lengths[:, None]
    return ids, valid


def run(model, ids, valid, n: int, stop_ids=()) -> tuple[float, int]:
    """Seconds and the number of tokens generated before each row's stop (or the end)."""
    t0 = time.process_time()
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    made = 0
    for tok, passes in tah.generate(model, ids, n, valid=valid, stop_ids=stop_ids):
        made += int((~done).sum())
        done |= torch.isin(tok, torch.tensor(list(stop_ids), dtype=torch.long))
    return time.process_time() - t0, made


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16], help="batch sizes")
    ap.add_argument("--new-tokens", type=int, default=32, help="tokens generated per row")
    ap.add_argument("--prompt-len", type=int, default=64, help="longest prompt, in tokens")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    vocab, n = 32000, args.new_tokens
    model = build(vocab)
    cases = {b: prompts(b, args.prompt_len, vocab) for b in args.batches}
    stops = {}  # the first tokens of rows 1.., less the tokens row 0 makes
    for b, (ids, valid) in cases.items():
        toks = torch.stack([t for t, _ in tah.generate(model, ids, n, valid=valid)], 1)  # (B, n)
        stops[b] = sorted(set(toks[1:, 0].tolist()) - set(toks[0].tolist()))
    times = {(b, kind): [] for b in args.batches for kind in ("run", "stop")}
    made = {}
    for r in range(args.repeats):
        for b, (ids, valid) in cases.items():
            for kind, stop_ids in (("run", ()), ("stop", stops[b])):
                seconds, made[b, kind] = run(model, ids, valid, n, stop_ids)
                times[b, kind].append(seconds)
        print(f"repeat {r + 1}/{args.repeats} done", flush=True)
    base = made[args.batches[0], "run"] / statistics.median(times[args.batches[0], "run"])
    print(f"\n{'batch':>5}{'tok/s':>9}{'x batch 1':>11}{'stop: tok/s':>13}{'tokens':>8}"
          f"{'time / run':>12}")
    for b in args.batches:
        speed = made[b, "run"] / statistics.median(times[b, "run"])
        t_stop = statistics.median(times[b, "stop"]) / statistics.median(times[b, "run"])
        stop_speed = made[b, "stop"] / statistics.median(times[b, "stop"])
        print(f"{b:5d}{speed:9.1f}{speed / base:11.2f}{stop_speed:13.1f}{made[b, 'stop']:8d}"
              f"{t_stop:12.2f}")


if __name__ == "__main__":
    main()
