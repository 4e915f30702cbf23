"""What bench/'s scripts measure the same way, each written once: memory in use and its peak
(this process's resident memory on a CPU, the CUDA allocator on a GPU), and greedy decoding
timed against transformers' generate or with a share p of the steps iterating. realsize.py (the
published sizes, on a GPU) and inference.py (small shapes, on a CPU) both call them."""
from __future__ import annotations

import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: tah.py
import torch  # noqa: E402

import tah  # noqa: E402

GIB = 2**30

class Memory:
    """Bytes in use on `device` and their peak since the last mark: the CUDA allocator's on a
    GPU (allocated; `reserved` adds its cache), this process's resident bytes on a CPU (Linux's
    VmRSS and VmHWM, the peak restarted by writing 5 to /proc/self/clear_refs; None elsewhere)."""

    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"

    def sync(self) -> None:  # the GPU's queued work done: clocks and counters see all of it
        if self.cuda:
            torch.cuda.synchronize()

    def resident(self, key: str) -> int | None:
        try:
            return int(re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(),
                                 re.M)[1]) * 1024
        except OSError:
            return None

    def now(self) -> int | None:
        self.sync()
        return torch.cuda.memory_allocated() if self.cuda else self.resident("VmRSS")

    def mark(self) -> int | None:
        """Restarts the peak from what is in use now; returns that."""
        self.sync()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        elif Path("/proc/self/clear_refs").exists():
            Path("/proc/self/clear_refs").write_text("5")
        return self.now()

    def peak(self) -> int | None:
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
    """Weights N(0, std), norms N(1, std): wider logits than the default initialisation, so
    that greedy decoding meets no near-ties and two libraries pick the same tokens."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(1.0 if p.dim() == 1 else 0.0, std)
    return model

def timed(fn, sync=lambda: None) -> tuple[float, float, object]:
    """(wall seconds, this process's CPU seconds, fn()); sync waits for a GPU. On a shared CPU
    the CPU time is the steadier (with 1 thread): other jobs stretch the wall clock, not it."""
    sync()
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    sync()
    return time.perf_counter() - wall, time.process_time() - cpu, out

@torch.no_grad()
def decode_vs_transformers(ours: tah.TaH, hf, prompt: torch.Tensor, n: int, *, repeats: int = 1,
                           warmup: int | None = None, log=None) -> dict:
    """Greedy decoding of n tokens after the (B, T) prompt by tah.generate (nobody iterating)
    and by transformers' generate (exactly n, its cache on), prefill included: a warm-up run of
    each (`warmup` tokens, default n), then `repeats` timed runs interleaved, ours then theirs,
    so that a slow moment of a shared machine hits both. Returns {"tah": {"wall": [seconds of
    each run], "cpu": [...]}, "hf": {...}, "tokens": (ours, theirs)}: the (B, n) tokens of the
    first timed runs. log(line) hears of each repeat."""
    runs = dict(tah=lambda k: torch.stack(
        [t for t, _ in tah.generate(ours, prompt, k, policy="standard")], 1),
        hf=lambda k: hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=k,
                                 min_new_tokens=k, do_sample=False, use_cache=True,
                                 eos_token_id=None, pad_token_id=0)[:, prompt.shape[1]:])
    sync = torch.cuda.synchronize if prompt.is_cuda else (lambda: None)
    res, tokens = {side: dict(wall=[], cpu=[]) for side in runs}, {}
    for run in runs.values():
        run(warmup or n)  # kernels chosen, buffers made
    for r in range(repeats):
        for side, run in runs.items():
            wall, cpu, out = timed(lambda: run(n), sync)
            res[side]["wall"].append(wall)
            res[side]["cpu"].append(cpu)
            tokens.setdefault(side, out)
        if log:
            log(f"repeat {r + 1}/{repeats}: " + ", ".join(
                f"{k} {n * len(prompt) / v['wall'][-1]:.1f} tok/s "
                f"({n * len(prompt) / v['cpu'][-1]:.1f} per CPU-s)" for k, v in res.items()))
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
    """Seconds (by `clock`) of `steps` greedy decode steps through the KV cache after a prefill
    (not timed) of the prompt, on the prompt's device (on a GPU the clock waits for its work).
    passes: "standard" (nobody iterates) or a (B, steps) tensor, the passes of each step."""
    B, T = prompt.shape
    cache = tah.KVCache(model, B, T + steps)
    tok = model(prompt, "standard", cache=cache, logits="last").logits[:, -1].argmax(-1)
    sync = torch.cuda.synchronize if prompt.is_cuda else (lambda: None)
    sync()
    t0 = clock()
    for s in range(steps):
        step = passes if isinstance(passes, str) else passes[:, s:s + 1]
        pos = torch.full((B, 1), T + s, device=prompt.device)
        out = model(tok[:, None], step, positions=pos, cache=cache, start=T + s)
        tok = out.logits[:, -1].argmax(-1)
    sync()
    return clock() - t0
