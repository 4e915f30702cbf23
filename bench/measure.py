"""The measurements bench/'s scripts share, each written once (realsize.py imports them), and
four commands that print them for generation on a CPU, with random Qwen3s in fp32:

    python bench/measure.py decode   # tah.generate vs transformers' generate, same weights
    python bench/measure.py cost --clock cpu --repeats 3   # TaH's forward and decoding at an
                                     # iterating share p against the standard ones
    python bench/measure.py batch    # tokens/s per batch size; rows that stop leave the batch
    python bench/measure.py prefill  # a 4096-token prefill's peak memory vs weights + KV cache

decode and prefill use Qwen3-0.6B's shape cut to 2 layers, cost and batch hidden 512, 8 layers,
vocab 32000 (--shape tiny: seconds). Timed runs interleave the sides in every repeat, so that a
slow moment of a shared machine hits both; --clock cpu (CPU time, 1 thread) is steadier there.
"""
from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: tah.py
import torch  # noqa: E402

import tah  # noqa: E402

GIB = 2**30


# ----------------------------------------------------------------------------- shared

class Memory:
    """Bytes in use and their peak since the last mark: the CUDA allocator's on a GPU, this
    process's resident bytes on a CPU (Linux's VmRSS, VmHWM; 5 to clear_refs restarts it)."""

    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"
        self.sync = torch.cuda.synchronize if self.cuda else lambda: None  # the GPU's work done

    def resident(self, key: str) -> int:
        return 1024 * int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text())[1])

    def now(self) -> int:
        self.sync()
        return torch.cuda.memory_allocated() if self.cuda else self.resident("VmRSS")

    def mark(self) -> int:
        """Restarts the peak from what is in use now; returns that."""
        self.sync()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            Path("/proc/self/clear_refs").write_text("5")
        return self.now()

    def peak(self) -> int:
        self.sync()
        return torch.cuda.max_memory_allocated() if self.cuda else self.resident("VmHWM")

    def reserved(self) -> int | None:
        return torch.cuda.max_memory_reserved() if self.cuda else None

def gib(n: float | str | None) -> str:
    """Bytes in GiB, or in MiB below 1 GiB; a string (what went wrong) as it is."""
    if n is None or isinstance(n, str):
        return n or "n/a"
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"

def spread(model: torch.nn.Module, std: float = 0.05) -> torch.nn.Module:
    """Weights N(0, std), norms N(1, std): logits with no near-ties for greedy decoding."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(1.0 if p.dim() == 1 else 0.0, std)
    return model

def timed(fn, sync=lambda: None) -> tuple[float, float, object]:
    """(wall seconds, this process's CPU seconds, fn()); sync waits for a GPU."""
    sync()
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    sync()
    return time.perf_counter() - wall, time.process_time() - cpu, out

@torch.no_grad()
def decode_vs_transformers(ours: tah.TaH, hf, prompt: torch.Tensor, n: int, *, repeats: int = 1,
                           warmup: int | None = None, log=lambda line: None) -> dict:
    """Greedy decoding of n tokens after the (B, T) prompt by tah.generate (nobody iterating)
    and transformers' generate, prefill included: a warm-up run each (`warmup` tokens, default
    n), then `repeats` timed runs interleaved. Returns {"tah": {"wall": [seconds a run], "cpu":
    [...]}, "hf": {...}, "tokens": (ours, theirs)}, those of the first timed runs (B, n)."""
    runs = dict(tah=lambda k: torch.stack(
        [t for t, _ in tah.generate(ours, prompt, k, policy="standard")], 1),
        hf=lambda k: hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=k,
                                 min_new_tokens=k, do_sample=False, use_cache=True,
                                 eos_token_id=None, pad_token_id=0)[:, prompt.shape[1]:])
    res, tokens = {side: dict(wall=[], cpu=[]) for side in runs}, {}
    for run in runs.values():
        run(warmup or n)  # kernels chosen, buffers made
    for r in range(repeats):
        for side, run in runs.items():
            wall, cpu, out = timed(lambda: run(n), Memory(prompt.device).sync)
            res[side]["wall"].append(wall)
            res[side]["cpu"].append(cpu)
            tokens.setdefault(side, out)
        log(f"repeat {r + 1}/{repeats}: " + ", ".join(
            f"{k} {len(prompt) * n / v['wall'][-1]:.1f} tokens/s" for k, v in res.items()))
    return res | {"tokens": (tokens["tah"], tokens["hf"])}

def forced_passes(shape: tuple[int, int], p: float, seed: int) -> torch.Tensor:
    """Passes (B, T): exactly round(p x B x T) of the tokens get 2, chosen at random, the rest 1."""
    n, g = shape[0] * shape[1], torch.Generator().manual_seed(seed)
    passes = torch.ones(n, dtype=torch.long)
    passes[torch.randperm(n, generator=g)[:round(p * n)]] = 2
    return passes.view(shape)

@torch.no_grad()
def decode_seconds(model: tah.TaH, prompt: torch.Tensor, steps: int, passes,
                   clock=time.perf_counter) -> float:
    """Seconds (by `clock`, waiting for a GPU) of `steps` greedy decode steps after an untimed
    prefill of the prompt; passes: "standard" (nobody iterates) or (B, steps), those of each."""
    B, T = prompt.shape
    cache, sync = tah.KVCache(model, B, T + steps), Memory(prompt.device).sync
    tok = model(prompt, "standard", cache=cache, logits="last").logits[:, -1].argmax(-1)
    sync()
    t0 = clock()
    for s in range(steps):
        step = passes if isinstance(passes, str) else passes[:, s:s + 1]
        pos = torch.full((B, 1), T + s, device=prompt.device)
        out = model(tok[:, None], step, positions=pos, cache=cache, start=T + s)
        tok = out.logits[:, -1].argmax(-1)
    sync()
    return clock() - t0


# ----------------------------------------------------------------------------- the commands

SHAPES = {"0.6b": (151936, 1024, 2, 16, 8, 128), "mid": (32000, 512, 8, 8, 4, 64),
          "tiny": (1000, 128, 2, 2, 1, 64)}  # vocab, hidden, layers, heads, kv heads, head_dim

def config(a) -> dict:  # a random Qwen3's: the shape's, with --layers if given
    vocab, hidden, layers, heads, kv_heads, head_dim = SHAPES[a.shape]
    return dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden,
                num_hidden_layers=a.layers or layers, num_attention_heads=heads,
                num_key_value_heads=kv_heads, head_dim=head_dim)

def tah_model(a) -> tah.TaH:  # with a LoRA (pass 2 runs it) and no decider, seed 0
    torch.manual_seed(0)
    return tah.TaH(tah.Qwen3Config(**config(a)), tah.TaHConfig(lora_dropout=0.0)).eval()

def decode(a, clock) -> None:
    from transformers import Qwen3Config, Qwen3ForCausalLM  # a test dependency
    torch.manual_seed(a.seed)
    hf = spread(Qwen3ForCausalLM(Qwen3Config(
        **config(a), tie_word_embeddings=True, max_position_embeddings=4096, bos_token_id=None,
        eos_token_id=None, pad_token_id=None)).float().eval())
    with tempfile.TemporaryDirectory() as d:  # ours reads what transformers wrote
        hf.save_pretrained(d)
        ours = tah.load(d, dtype=torch.float32)
    g, n = torch.Generator().manual_seed(a.seed), a.new_tokens
    prompt = torch.randint(0, ours.config.vocab_size, (1, a.prompt_len), generator=g)
    r = decode_vs_transformers(ours, hf, prompt, n, repeats=a.repeats, log=print)
    wall, cpu = ({k: r[k][c] for k in ("tah", "hf")} for c in ("wall", "cpu"))
    for k in wall:  # the best of the repeats: the least disturbed run
        print(f"{k:5s}: {n / min(wall[k]):7.1f} tokens/s wall, {n / min(cpu[k]):7.1f} per CPU-s")
    print(f"ratio ours/HF: {min(cpu['hf']) / min(cpu['tah']):.2f}x by CPU time (medians "
          f"{statistics.median(cpu['hf']) / statistics.median(cpu['tah']):.2f}x), "
          f"{min(wall['hf']) / min(wall['tah']):.2f}x by wall time; target >= 1.0x\n"
          f"greedy tokens identical: {torch.equal(*r['tokens'])}")

def cost(a, clock) -> None:
    model, T, steps, c = tah_model(a), a.prompt_len, a.new_tokens, config(a)
    print(f"hidden {c['hidden_size']}, {c['num_hidden_layers']} layers, vocab {c['vocab_size']}, "
          f"LoRA r 16; {steps} decode steps; {a.threads} thread(s), {a.clock} clock")
    ids = torch.randint(0, c["vocab_size"], (1, T), generator=torch.Generator().manual_seed(1))
    ps = [None] + a.fractions  # None: the standard forward, nobody iterating
    fwd_passes = {p: forced_passes((1, T), p, 2) if p is not None else "standard" for p in ps}
    dec_passes = {p: forced_passes((1, steps), p, 3) if p is not None else "standard" for p in ps}
    forward = torch.no_grad()(lambda passes: timed(lambda: model(ids, passes))[a.clock == "cpu"])
    forward(fwd_passes[ps[-1]])  # warm up; timed's [0] is wall seconds, [1] CPU seconds
    decode_seconds(model, ids[:, :16], 4, dec_passes[ps[-1]][:, :4], clock)
    fwd, dec = ({p: [] for p in ps} for _ in range(2))
    for r in range(a.repeats):
        for p in ps:  # interleaved
            fwd[p].append(forward(fwd_passes[p]))
            dec[p].append(decode_seconds(model, ids, steps, dec_passes[p], clock))
        print(f"repeat {r + 1}/{a.repeats} done", flush=True)
    f0, d0 = statistics.median(fwd[None]), statistics.median(dec[None])
    print(f"\nstandard: forward of {T} tokens {f0 * 1e3:.1f} ms, decode {steps / d0:.1f} tokens/s"
          f"\n{'p':>5} {'forward / standard':>18} {'target <=':>9} {'decode tok/s / standard':>23}"
          f" {'target >=':>9}")
    misses = 0
    for p in a.fractions:
        f, d = statistics.median(fwd[p]) / f0, d0 / statistics.median(dec[p])
        misses += (f > (1 + p) * 1.15) + (d < 0.95 / (1 + p))
        print(f"{p:5g} {f:18.3f} {(1 + p) * 1.15:9.3f}{' MISSED' * (f > (1 + p) * 1.15):7} "
              f"{d:15.3f} {0.95 / (1 + p):9.3f}{' MISSED' * (d < 0.95 / (1 + p))}")
    print(f"\n{misses or 'all'} targets {'MISSED' if misses else 'met'}")

def batch(a, clock) -> None:
    model, n, T, cases, stops = tah_model(a), a.new_tokens, a.prompt_len, {}, {}
    for b in a.batches:  # prompts of T/2..T tokens, left-padded
        g = torch.Generator().manual_seed(b)
        ids = torch.randint(0, model.config.vocab_size, (b, T), generator=g)
        lengths = torch.randint(T // 2, T + 1, (b,), generator=g)
        cases[b] = ids, torch.arange(T)[None] >= T - lengths[:, None]
        toks = torch.stack([t for t, _ in tah.generate(model, ids, n, valid=cases[b][1])], 1)
        stops[b] = sorted(set(toks[1:, 0].tolist()) - set(toks[0].tolist()))  # rows 1.. stop

    def run(ids, valid, stop_ids) -> tuple[float, int]:  # seconds, tokens made before the stops
        t0, done, made = clock(), torch.zeros(len(ids), dtype=torch.bool), 0
        for tok, _ in tah.generate(model, ids, n, valid=valid, stop_ids=stop_ids):
            made += int((~done).sum())
            done |= torch.isin(tok, torch.tensor(stop_ids, dtype=torch.long))
        return clock() - t0, made
    times, made = {(b, k): [] for b in a.batches for k in ("run", "stop")}, {}
    for r in range(a.repeats):
        for b, (ids, valid) in cases.items():
            for kind, stop_ids in (("run", []), ("stop", stops[b])):
                seconds, made[b, kind] = run(ids, valid, stop_ids)
                times[b, kind].append(seconds)
        print(f"repeat {r + 1}/{a.repeats} done", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    base = made[a.batches[0], "run"] / med[a.batches[0], "run"]
    print(f"\n{'batch':>5}{'tok/s':>9}{'x batch 1':>11}{'stop: tok/s':>13}{'tokens':>8}"
          f"{'time / run':>12}")
    for b in a.batches:
        speed = made[b, "run"] / med[b, "run"]
        print(f"{b:5d}{speed:9.1f}{speed / base:11.2f}{made[b, 'stop'] / med[b, 'stop']:13.1f}"
              f"{made[b, 'stop']:8d}{med[b, 'stop'] / med[b, 'run']:12.2f}")

def prefill(a, clock) -> None:
    config_, T, memory = tah.Qwen3Config(**config(a)), a.prompt_len, Memory(torch.device("cpu"))
    torch.manual_seed(0)
    ids, before = torch.randint(0, config_.vocab_size, (1, T)), memory.now()
    with torch.device("meta"):
        model = tah.TaH(config_)
    model = model.to_empty(device="cpu").eval()  # no init temporaries; to_empty unties the head
    model.lm_head.weight = model.model.embed_tokens.weight
    with torch.no_grad():
        for weight in model.parameters():
            weight.normal_(0.0, 0.02)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    L, kv_heads, depths = config_.num_hidden_layers, config_.num_key_value_heads, model.tah.max_iter
    kv = 2 * L * depths * (T + 1) * kv_heads * config_.head_dim * 4  # k and v in fp32
    memory.mark()  # building the model (weights tied after to_empty) is not the prefill's cost
    next(tah.generate(model, ids, 1))
    peak = memory.peak() - before
    print(f"{L} layers, {T}-token prefill, fp32: weights {weights / 2**20:.0f} MiB, KV cache "
          f"({depths} depths) {kv / 2**20:.0f} MiB\npeak memory above the start: "
          f"{peak / 2**20:.0f} MiB = {peak / (weights + kv):.2f}x weights + KV cache "
          "(target <= 1.2x)")

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, shape, prompt, new, repeats in [("decode", "0.6b", 512, 128, 3),
                                              ("cost", "mid", 512, 64, 5),
                                              ("batch", "mid", 64, 32, 3),
                                              ("prefill", "0.6b", 4096, 0, 0)]:
        c = sub.add_parser(name, help=f"see {name} above",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        c.set_defaults(run=globals()[name], clock="cpu" if name == "batch" else "wall")
        c.add_argument("--shape", choices=list(SHAPES), default=shape, help="model shape")
        c.add_argument("--layers", type=int, help="decoder layers (None: the shape's)")
        c.add_argument("--prompt-len", type=int, default=prompt, help="tokens of the prompt")
        c.add_argument("--threads", type=int, default=1, help="torch CPU threads")
        if name in ("cost", "batch"):
            c.add_argument("--clock", choices=["wall", "cpu"], default=c.get_default("clock"),
                           help="wall time, or this process's CPU time")
        if new:
            c.add_argument("--new-tokens", type=int, default=new,
                           help="tokens generated per run (cost: the decode steps timed)")
            c.add_argument("--repeats", type=int, default=repeats, help="interleaved repeats")
    add = {name: c.add_argument for name, c in sub.choices.items()}
    add["decode"]("--seed", type=int, default=0, help="seed of the weights and the prompt")
    add["cost"]("--fractions", type=float, nargs="+", default=[0.0, 0.1, 0.5, 1.0],
                help="shares p of the tokens (and decode steps) iterating")
    add["batch"]("--batches", type=int, nargs="+", default=[1, 4, 16], help="batch sizes")
    return p.parse_args(argv)

def main(argv=None) -> None:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    a.run(a, time.process_time if a.clock == "cpu" else time.perf_counter)


if __name__ == "__main__":
    main()
