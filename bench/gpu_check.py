"""The GPU path of `train.py --size 0.6b`, checked in one command, with a table for the README.

    python bench/gpu_check.py                      # one CUDA GPU, bf16: every check, ~8 minutes
    python bench/gpu_check.py --dry-run            # the same code, tiny shapes, fp32, on the CPU
    python bench/gpu_check.py --parts stage1 attention   # some parts, or single checks by id
    python bench/gpu_check.py --tokenizer DIR      # Qwen3's tokenizer.json, not a word-level one
    python bench/gpu_check.py --budget 900         # a slower GPU: every time guard grows with it

Nothing downloads. The models are random Qwen3s built here at the published shapes (Qwen3-0.6B:
tah.Qwen3Config's defaults; Qwen3-1.7B: hidden 2048, intermediate 6144, the rest the same), saved
once with tah.save and reused. The tokenizer is a word-level one, made as train.py makes the toy's
but holding the words of 40 math rows and Qwen3's special tokens (train.py --size 0.6b needs its
chat format), or Qwen3's own with --tokenizer DIR.

Every check runs in its own process with a time guard: an out-of-memory, a crash or a hang is a
row of the table that says so, and the next check runs. The most needed run first; the others
("if time allows") get their share of --budget plus what the earlier ones left.
  stage1-*   a few optimizer steps of train.py's own stage 1 (train.stage1, oracle labels with
             ~15% of the tokens iterating) or AlwaysThink (train.baseline "always") on random
             rows: torch.cuda.max_memory_allocated / max_memory_reserved, tokens/s
  attention  which SDPA kernel takes tah's duo-causal call (a boolean mask (B, 1, T, S) with
             grouped-query heads): each backend alone under sdpa_kernel, on the arguments tah's
             Attention really passes; times and memory for one layer
  decode-*   tah.generate against transformers' generate on the same weights, greedy, tokens
             compared; TaH decoding with a share p of the steps iterating, against standard
  pipeline   python train.py --size 0.6b end to end (data, labels, stage 1, stage 2, evaluation)
             on the random model and 40 rows, with its wall time
The table (markdown) goes to stdout, the same as JSON to --json; progress goes to stderr.
For tests, GPU_CHECK_FAULT="ID=raise" (or "ID=oom", "ID=hang") makes check ID fail (run out
of memory, hang).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, replace
from functools import partial
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]  # the repository: tah.py, train.py, bench/
sys.path.insert(0, str(ROOT))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from torch.optim.optimizer import register_optimizer_step_post_hook  # noqa: E402

import tah  # noqa: E402
import train  # noqa: E402
from bench.rehearse import math_rows  # noqa: E402
from bench.tah_cost import policy as forced_passes, time_decode  # noqa: E402

GIB = 2**30
HARD = 0.15  # share of the tokens that iterate in stage 1, as in the paper's oracle labels
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]  # Qwen3's
QWEN3_VOCAB = 151936
SHAPES = {"0.6b": {}, "1.7b": dict(hidden_size=2048, intermediate_size=6144)}  # on the defaults
TINY = {"0.6b": dict(hidden_size=64, intermediate_size=128),  # the dry run's stand-ins
        "1.7b": dict(hidden_size=96, intermediate_size=192)}
TINY_LAYOUT = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   max_position_embeddings=1024, torch_dtype="float32")


class Setting:
    """Where and at what size a check runs: a CUDA GPU in bf16 at the published sizes, or (the
    dry run) the CPU in fp32 at tiny ones. Everything that differs between the two is here."""

    def __init__(self, dry: bool, work, tokenizer):
        self.dry, self.work, self.tokenizer = dry, Path(work), Path(tokenizer)
        self.device = torch.device("cpu" if dry else "cuda")
        self.dtype = torch.float32 if dry else torch.bfloat16
        self.shrink = 64 if dry else 1  # lengths: 4096 tokens -> 64 in the dry run
        self.steps = 3 if dry else 5  # optimizer steps per stage-1 check; the first warms up
        self.decode_len = 16 if dry else 256  # prompt tokens, and new tokens, of the decode checks
        self.repeats = 2 if dry else 5  # timed repeats of an attention call

    def amp(self):
        return torch.autocast(self.device.type, torch.bfloat16, enabled=not self.dry)

    def sync(self) -> None:
        if not self.dry:
            torch.cuda.synchronize()

    def free(self) -> None:
        gc.collect()
        if not self.dry:
            torch.cuda.empty_cache()

    def memory_mark(self) -> int:
        """Restarts the peak-memory count; returns the bytes in use now (CPU: resident memory)."""
        self.sync()
        if self.dry:
            try:
                Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM restarts from VmRSS
            except OSError:
                pass
            return resident("VmRSS")
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()

    def memory_peak(self) -> dict:
        """The peak since memory_mark: GPU allocated and reserved, or CPU resident bytes."""
        self.sync()
        if self.dry:
            return dict(peak_resident=resident("VmHWM"))
        return dict(peak_allocated=torch.cuda.max_memory_allocated(),
                    peak_reserved=torch.cuda.max_memory_reserved())

    def config(self, shape: str) -> tah.Qwen3Config:
        """The Qwen3 config of `shape` for this setting, with room for the tokenizer's ids."""
        from tokenizers import Tokenizer
        vocab = Tokenizer.from_file(str(self.tokenizer / "tokenizer.json")).get_vocab_size()
        if self.dry:
            return tah.Qwen3Config(vocab_size=-(-vocab // 64) * 64, **TINY_LAYOUT, **TINY[shape])
        if vocab > QWEN3_VOCAB:
            raise ValueError(f"{self.tokenizer}: {vocab} tokens, more than Qwen3's {QWEN3_VOCAB}")
        return tah.Qwen3Config(**SHAPES[shape])


def resident(key: str) -> int | None:
    """VmRSS or VmHWM (the peak) of this process in bytes, from /proc (Linux); None elsewhere."""
    try:
        return int(re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(),
                             re.M)[1]) * 1024
    except OSError:
        return None


def gib(n: float | str | None) -> str:
    """Bytes in GiB, or in MiB below 1 GiB; a string (what went wrong) as it is."""
    if n is None or isinstance(n, str):
        return n or "n/a"
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


def memory_words(peak: dict) -> str:
    if "peak_resident" in peak:
        return f"peak resident memory {gib(peak['peak_resident'])}"
    return f"peak allocated {gib(peak['peak_allocated'])}, reserved {gib(peak['peak_reserved'])}"


def random_model(s: Setting, shape: str) -> Path:
    """A random Qwen3 of `shape`, saved with the tokenizer by the first check that needs it and
    reused by the others. Weights N(0, 0.05), norms N(1, 0.05), as bench/decode.py spreads them:
    wider than the default init, so that greedy decoding meets no near-ties."""
    config = s.config(shape)
    d = s.work / f"qwen3-{shape}{'-tiny' * s.dry}-vocab{config.vocab_size}-random"
    if not (d / "config.json").exists():
        torch.manual_seed(0)
        with torch.device(s.device):
            model = tah.TaH(config)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(1.0 if p.dim() == 1 else 0.0, 0.05)
        tah.save(model.to(s.dtype), d, tokenizer_dir=s.tokenizer)  # written whole or not at all
        del model
        s.free()
    return d


def random_rows(vocab: int, tokens: int, n: int, share: float) -> tuple[dict, torch.Tensor]:
    """n random rows of `tokens` tokens in train.py's data layout (a prompt of 1/8, then the
    scored response) and oracle-style labels: 2 (iterate) at round(share x tokens) response
    positions of each row, as train.compute_labels writes them (flat, aligned with the ids)."""
    g = torch.Generator().manual_seed(tokens)
    start = tokens // 8
    ids = torch.randint(0, vocab, (n, tokens), generator=g)
    labels = torch.ones(n, tokens, dtype=torch.uint8)
    for r in range(n):  # the last position predicts nothing: never hard
        hard = start + torch.randperm(tokens - 1 - start, generator=g)[:round(share * tokens)]
        labels[r, hard] = 2
    target = (torch.arange(tokens) >= start).to(torch.uint8).repeat(n)
    data = dict(ids=ids.flatten().int(), target=target, offsets=torch.arange(n + 1) * tokens,
                start=torch.full((n,), start), train=torch.arange(n), held=torch.arange(0))
    return data, labels.flatten()


# ----------------------------------------------------------------------------- 1. stage 1

def check_stage1(s: Setting, shape: str, tokens: int, policy: str) -> dict:
    """s.steps optimizer steps of train.py's stage 1 (oracle labels, ~15% of the tokens
    iterating) or of its AlwaysThink baseline (every token), one row of `tokens` tokens a step:
    micro-batch 1, bf16 autocast, gradient checkpointing, as `train.py --size` runs them."""
    tokens //= s.shrink
    model_dir, out = random_model(s, shape), s.work / f"stage1-{shape}-{tokens}-{policy}"
    data, labels = random_rows(s.config(shape).vocab_size, tokens, s.steps, HARD)
    argv = ["--size", shape, "--model", str(model_dir), "--reference", str(model_dir),
            "--out", str(out), "--max-len", str(tokens), "--batch", "1", "--micro-batch", "1",
            "--save-every", "0", "--no-resume", "--device", s.device.type,
            "--dtype", str(s.dtype).removeprefix("torch.")]
    argv += ["--decider-layers", "0", "1", "--threads", "1"] if s.dry else []
    run = train.Run(train.parse_args(argv))  # makes --out and writes its settings.json
    stamps = []  # the time at the end of every optimizer step: the steps' times are the gaps

    def stamp(*_) -> None:
        s.sync()
        stamps.append(time.perf_counter())
    hook = register_optimizer_step_post_hook(stamp)
    rows = torch.arange(s.steps)
    s.memory_mark()  # before the model loads: the whole stage's peak
    try:
        if policy == "always":
            train.baseline(run, "always", base=model_dir, data=data, rows=rows, steps=s.steps)
        else:
            train.stage1(run, base=model_dir, data=data, labels=labels, rows=rows,
                         steps=s.steps)
    finally:
        hook.remove()
        shutil.rmtree(out, ignore_errors=True)  # the stage's checkpoint: up to 7 GB
    peak = s.memory_peak()
    step = statistics.median(b - a for a, b in zip(stamps, stamps[1:]))
    share = 1.0 if policy == "always" else float((labels == 2).float().mean())
    figures = dict(shape=shape, tokens=tokens, policy=policy, iterating=share, steps=s.steps,
                   step_seconds=step, tokens_per_second=tokens / step, **peak)
    words = (f"{tokens} tokens, {share:.1%} iterating: {memory_words(peak)}; "
             f"{tokens / step:,.0f} tokens/s ({step:.2f} s a step, median of {len(stamps) - 1})")
    return dict(figures=figures, rows=[dict(result=words)])


# ----------------------------------------------------------------------------- 2. attention

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
KERNEL_OPS = {"flash": "_scaled_dot_product_flash_attention",  # aten ops, as the profiler names
              "efficient": "_scaled_dot_product_efficient_attention",
              "cudnn": "_scaled_dot_product_cudnn_attention",
              "math": "_scaled_dot_product_attention_math"}


def sdpa_calls(s: Setting, model: tah.TaH, tokens: int) -> list[tuple]:
    """The arguments tah's Attention passes to SDPA in one forward of `tokens` tokens with ~15%
    iterating (in the training dtype): [pass 1's (T queries, T keys), pass 2's (T_d, T + T_d)]."""
    data, labels = random_rows(model.config.vocab_size, tokens, 1, HARD)
    b = train.make_batch(data, torch.arange(1), labels, s.device)
    calls, real = [], F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        calls.append((q, k, v, attn_mask, kw))
        return real(q, k, v, attn_mask=attn_mask, **kw)
    F.scaled_dot_product_attention = spy  # tah.py calls it through this module
    try:
        with torch.no_grad(), s.amp():
            model(b["ids"], b["passes"], valid=b["valid"])
    finally:
        F.scaled_dot_product_attention = real
    return calls


def attend(s: Setting, call: tuple, backend: str | None = None) -> torch.Tensor:
    """One forward and backward of a recorded call under one SDPA backend (None: PyTorch's
    choice), under autocast as in training; returns the output."""
    q, k, v, mask, kw = call
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    with sdpa_kernel([BACKENDS[backend]]) if backend else nullcontext(), s.amp():
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kw)
    y.float().sum().backward()
    return y.detach()


def call_memory(s: Setting, call: tuple, backend: str) -> int | str | None:
    """Bytes one forward+backward of `call` holds above its inputs, or "out of memory"."""
    s.free()
    base = s.memory_mark()
    try:
        attend(s, call, backend)
    except torch.OutOfMemoryError:
        return "out of memory"
    peak = s.memory_peak()
    top = peak.get("peak_allocated", peak.get("peak_resident"))
    return None if top is None or base is None else top - base


def seconds(s: Setting, fn) -> float:
    """Median wall seconds of fn() over s.repeats runs after one warm-up."""
    fn()
    times = []
    for _ in range(s.repeats):
        s.sync()
        t = time.perf_counter()
        fn()
        s.sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def check_attention(s: Setting) -> dict:
    """Each SDPA backend alone on tah's two calls of one layer (pass 1, pass 2) at 4096 tokens:
    accepted or refused (with PyTorch's reasons), forward+backward time, the largest difference
    from tah.attention_reference, and the memory pass 1's call adds at 4096 and 8192 tokens."""
    # one layer of the real layout; the vocabulary does not reach attention
    config = replace(s.config("0.6b"), num_hidden_layers=1, vocab_size=1024)
    torch.manual_seed(0)
    model = tah.TaH(config, tah.TaHConfig(lora_dropout=0.0)).to(s.device).eval()
    lengths = [4096 // s.shrink, 8192 // s.shrink]
    calls = sdpa_calls(s, model, lengths[0])
    q, k, _, mask, _ = calls[0]
    dtypes = "/".join(str(x.dtype).removeprefix("torch.") for x in calls[0][:4])
    layout = (f"mask {tuple(mask.shape)}, {q.shape[1]} query / {k.shape[1]} kv heads of "
              f"{q.shape[-1]}, enable_gqa; q/k/v/mask {dtypes}")
    refs = [tah.attention_reference(*(x.float() for x in c[:3]), c[3]) for c in calls]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for c in calls:
            attend(s, c)
    ops = {e.key for e in prof.key_averages()}
    chosen = [name for name, op in KERNEL_OPS.items() if any(op in o for o in ops)]
    ms = [seconds(s, partial(attend, s, c)) * 1e3 for c in calls]
    figures = dict(tokens=lengths[0], layout=layout, default=chosen, backends={})
    rows = [dict(what="SDPA kernel PyTorch picks for tah's call",
                 result=f"{'/'.join(chosen) or 'unknown'}: {sum(ms):.2f} ms forward+backward "
                        f"per layer at {lengths[0]} tokens (pass 1 {ms[0]:.2f}, pass 2 "
                        f"{ms[1]:.2f}); {layout}")]
    for name in BACKENDS:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:  # torch's max keeps a NaN (Python's may drop it)
                diff = float(torch.stack([(attend(s, c, name).float() - r).abs().max()
                                          for c, r in zip(calls, refs)]).max())
            except RuntimeError as e:  # "No available kernel": the warnings say why (an
                # out-of-memory is a RuntimeError too, and says so)
                why = list(dict.fromkeys(re.sub(r"\s*\(Triggered internally at .*", "",
                                                str(w.message), flags=re.S) for w in caught))
                reason = " ".join(" ".join(why + [str(e).splitlines()[0]]).split())[:400]
                figures["backends"][name] = dict(accepted=False, reason=reason)
                rows.append(dict(what=f"SDPA backend {name} alone", result=f"refused: {reason}"))
                continue
        ms = [seconds(s, partial(attend, s, c, name)) * 1e3 for c in calls]
        extra = [call_memory(s, calls[0], name)] + [  # one layer's pass-1 call, above its inputs
            call_memory(s, sdpa_calls(s, model, n)[0], name) for n in lengths[1:]]
        agrees = diff <= (1e-4 if s.dry else 5e-2)  # fp32, or bf16 against an fp32 reference
        figures["backends"][name] = dict(accepted=True, agrees=agrees, ms=ms, max_diff=diff,
                                         extra_bytes=dict(zip(lengths, extra)))
        rows.append(dict(what=f"SDPA backend {name} alone",
                         result=f"accepted{'' if agrees else ' but WRONG'}: {sum(ms):.2f} ms "
                                f"forward+backward per layer (pass 1 "
                                f"{ms[0]:.2f}, pass 2 {ms[1]:.2f}); max |diff| from "
                                f"attention_reference {diff:.1e}; pass 1's call adds " +
                                ", ".join(f"{gib(x)} at {n}" for n, x in zip(lengths, extra))))
    return dict(figures=figures, rows=rows)


# ----------------------------------------------------------------------------- 3. decoding

def hf_generate(hf, prompt: torch.Tensor, n: int) -> torch.Tensor:
    out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                      min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[:, prompt.shape[1]:]


def tah_generate(model: tah.TaH, prompt: torch.Tensor, n: int) -> torch.Tensor:
    return torch.stack([t for t, _ in tah.generate(model, prompt, n, policy="standard")], 1)


def timed(s: Setting, fn) -> tuple[float, torch.Tensor]:
    s.sync()
    t = time.perf_counter()
    out = fn()
    s.sync()
    return time.perf_counter() - t, out


def agreement(ours: torch.Tensor, theirs: torch.Tensor) -> tuple[str, int | None]:
    """Words for how far two (B, N) greedy outputs agree, and the first mismatch (1-based)."""
    same = ours == theirs
    B, N = same.shape
    if same.all():
        return f"tokens identical ({B} x {N})", None
    first = torch.where(same.all(1), N, (~same).int().argmax(1))  # (B,) first differing index
    row = int(first.argmin())
    return (f"first mismatch at new token {int(first[row]) + 1} of {N} (row {row}); "
            f"{int(same.all(1).sum())} of {B} rows identical"), int(first[row]) + 1


def check_decode(s: Setting, shape: str) -> dict:
    """tah.generate and transformers' generate on the same saved weights, in s.dtype, greedy,
    batch 1 and 16 (prefill included in the time; one short warm-up each, then one timed run);
    then TaH decoding at batch 1 with a share p = 0, 0.1, 0.5 of the steps iterating."""
    from transformers import Qwen3ForCausalLM  # a test dependency: only this check needs it
    d, n = random_model(s, shape), s.decode_len
    ours = tah.load(d, device=s.device, dtype=s.dtype)
    dtype_kw = "dtype" if int(version("transformers").split(".")[0]) >= 5 else "torch_dtype"
    hf = Qwen3ForCausalLM.from_pretrained(d, **{dtype_kw: s.dtype}).to(s.device).eval()
    g = torch.Generator().manual_seed(0)
    rows, figures = [], dict(shape=shape, prompt=n, new=n, batches={})
    for B in (1, 16):
        prompt = torch.randint(0, ours.config.vocab_size, (B, n), generator=g).to(s.device)
        tah_generate(ours, prompt, 4)  # warm-up: kernels chosen, buffers made
        hf_generate(hf, prompt, 4)
        t_ours, a = timed(s, partial(tah_generate, ours, prompt, n))
        t_hf, b = timed(s, partial(hf_generate, hf, prompt, n))
        words, first = agreement(a, b)
        figures["batches"][B] = dict(identical=first is None, first_mismatch=first,
                                     tah_tokens_per_s=B * n / t_ours, hf_tokens_per_s=B * n / t_hf)
        rows.append(dict(what=f"greedy decode {shape}, batch {B}, {n}-token prompt + {n} new: "
                              "tah.generate vs transformers",
                         result=f"{words}; {B * n / t_ours:,.0f} vs {B * n / t_hf:,.0f} tokens/s "
                                f"({t_hf / t_ours:.2f}x), prefill included"))
    del hf
    model = tah.add_parts(ours, tah.TaHConfig(lora_dropout=0.0))  # a LoRA for pass 2
    prompt = torch.randint(0, ours.config.vocab_size, (1, n), generator=g).to(s.device)
    time_decode(model, prompt[:, :8], 8, forced_passes((1, 8), 0.5, 0).to(s.device))  # warm
    speed = {p: n / time_decode(model, prompt, n, forced_passes((1, n), p, 3).to(s.device))
             for p in (0.0, 0.1, 0.5)}
    figures["tah_decode_tokens_per_s"] = speed
    rows.append(dict(what=f"TaH decode {shape}, batch 1, {n} steps after {n} tokens, a share p "
                          "iterating, vs standard (p = 0)",
                     result=f"standard {speed[0.0]:,.1f} tokens/s; " + "; ".join(
                         f"p = {p}: {speed[p]:,.1f} ({speed[p] / speed[0.0]:.2f}x; "
                         f"1/(1+p) = {1 / (1 + p):.2f})" for p in (0.1, 0.5))))
    return dict(figures=figures, rows=rows)


# ----------------------------------------------------------------------------- 4. the pipeline

PIPELINE_FLAGS = ["--steps", "2", "--decider-steps", "2", "--batch", "2", "--micro-batch", "1",
                  "--eval-samples", "2", "--save-every", "0"]
CHECKPOINT = ["config.json", "model.safetensors", "tah_config.json", "decider.safetensors",
              "lora/adapter_model.safetensors"]


def check_pipeline(s: Setting) -> dict:
    """`python train.py --size 0.6b` as a user runs it, on the random 0.6B and the 40 rows:
    data, oracle labels, stage 1, stage 2, evaluation; its wall time and what it wrote."""
    model_dir, out = random_model(s, "0.6b"), s.work / "pipeline-run"
    shutil.rmtree(out, ignore_errors=True)
    flags = ["--size", "0.6b"] + PIPELINE_FLAGS + (
        ["--device", "cpu", "--dtype", "float32", "--decider-layers", "0", "1", "2",
         "--threads", "1"] if s.dry else [])
    cmd = [sys.executable, "train.py", *flags, "--model", str(model_dir), "--reference",
           str(model_dir), "--data", str(s.work / "rows.jsonl"), "--out", str(out)]
    t, output = time.perf_counter(), []
    with subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True) as p:
        for line in p.stdout:  # into this check's log as it comes: a time guard's kill keeps it
            print(line, end="", flush=True)
            output.append(line)
    wall = time.perf_counter() - t
    if p.returncode:
        raise RuntimeError(f"train.py exited {p.returncode}: {last_words(''.join(output))}")
    written = [f for f in CHECKPOINT if (out / "tah" / f).exists()]
    evaluated = json.loads((out / "eval.json").read_text())["tah"]
    figures = dict(seconds=wall, exit=p.returncode, checkpoint=str(out / "tah"),
                   checkpoint_written=written == CHECKPOINT, files=written,
                   policies=list(evaluated))
    return dict(figures=figures, rows=[dict(result=(
        f"exit 0 in {wall:.0f} s (python train.py {' '.join(flags)}, 40 rows); "
        f"checkpoint written: {'yes' if written == CHECKPOINT else 'NO'} (tah/: "
        f"{', '.join(written)}); evaluated: {', '.join(evaluated)}"))])


# ----------------------------------------------------------------------------- the checks

def check_env(s: Setting) -> dict:
    try:  # only the decode checks need it (a test dependency)
        transformers = version("transformers")
    except PackageNotFoundError:
        transformers = "not installed"
    info = dict(torch=torch.__version__, cuda=torch.version.cuda,
                cudnn=torch.backends.cudnn.version(), transformers=transformers)
    if not s.dry:
        if not torch.cuda.is_available():
            raise RuntimeError(f"no CUDA GPU visible to torch {torch.__version__} (CUDA build "
                               f"{torch.version.cuda}); try --dry-run to run the check on a CPU")
        p = torch.cuda.get_device_properties(0)
        info |= dict(gpu=p.name, gpu_memory_gib=round(p.total_memory / GIB, 1),
                     capability=f"{p.major}.{p.minor}")
    return dict(figures=info, rows=[])


@dataclass
class Check:
    id: str
    what: str  # the row's name in the table
    weight: float  # planned seconds of the default --budget 480
    priority: int  # run order: what the README needs most runs first
    run: Callable[[Setting], dict]


def stage1(shape: str, tokens: int, policy: str, weight: float, priority: int) -> Check:
    who = "every token iterating (AlwaysThink)" if policy == "always" else \
        "~15% iterating (oracle labels)"
    return Check(f"stage1-{shape}-{tokens}-{policy}",
                 f"stage 1, {shape} shape, {tokens} tokens, {who}", weight, priority,
                 partial(check_stage1, shape=shape, tokens=tokens, policy=policy))


CHECKS = [  # in the table's order; `priority` is the order they run in
    stage1("0.6b", 4096, "oracle", 60, 1),
    stage1("0.6b", 4096, "always", 45, 2),
    stage1("0.6b", 8192, "oracle", 40, 6),
    stage1("0.6b", 8192, "always", 40, 7),
    stage1("1.7b", 4096, "oracle", 50, 9),
    Check("attention", "duo-causal attention: SDPA kernels", 40, 3, check_attention),
    Check("decode-0.6b", "decoding, 0.6b shape", 75, 4, partial(check_decode, shape="0.6b")),
    Check("decode-1.7b", "decoding, 1.7b shape", 60, 8, partial(check_decode, shape="1.7b")),
    Check("pipeline", "python train.py --size 0.6b end to end", 70, 5, check_pipeline),
]
BY_ID = {c.id: c for c in CHECKS} | {"env": Check("env", "environment", 0, 0, check_env)}


def child(a) -> None:
    """One check in this process; its result goes to WORK/ID.json."""
    s = Setting(a.dry_run, a.work, a.tokenizer)
    if s.dry:
        torch.set_num_threads(1)  # tiny models: threads cost more than they give
    faults = dict(f.split("=", 1) for f in os.environ.get("GPU_CHECK_FAULT", "").split(",")
                  if "=" in f)
    if faults.get(a.child) == "raise":
        raise RuntimeError(f"{a.child}: a failure injected by GPU_CHECK_FAULT")
    if faults.get(a.child) == "oom":
        raise torch.OutOfMemoryError(f"{a.child}: CUDA out of memory, injected by GPU_CHECK_FAULT")
    if faults.get(a.child) == "hang":
        time.sleep(3600)
    result = BY_ID[a.child].run(s)
    (s.work / f"{a.child}.json").write_text(json.dumps(result))


# ----------------------------------------------------------------------------- the parent

def last_words(log: str) -> str:
    """The line of a log that says what went wrong: the exception, or else the last line."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"(\w+\.)*\w*(Error|Exception)\b|error:", line)]
    return (errors or lines or ["(no output)"])[-1][:400]


def run_child(a, check_id: str, guard: float) -> dict:
    """Runs one check in a child process group, killed at `guard` seconds; its record."""
    cmd = [sys.executable, __file__, "--child", check_id, "--work", str(a.work),
           "--tokenizer", str(a.tokenizer)] + ["--dry-run"] * a.dry_run
    log = a.work / f"{check_id}.log"
    t = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                             env=os.environ | {"PYTHONUNBUFFERED": "1"},  # a killed one's log
                             start_new_session=True)  # its own group: train.py's goes with it
        try:
            rc = p.wait(timeout=max(guard, 0.1))
        except subprocess.TimeoutExpired:
            rc = None
        finally:  # also on Ctrl-C: nothing of a check outlives the parent
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    seconds = time.perf_counter() - t
    text = log.read_text(errors="replace")
    record = dict(id=check_id, seconds=round(seconds, 1), guard_s=round(guard, 1), error=None)
    lines = [line for line in text.splitlines() if line.strip()]
    if rc is None:
        record |= dict(status="time guard", error=f"stopped by its time guard after "
                       f"{seconds:.0f} s (its share of --budget {a.budget:g}); its last output: "
                       f"{(lines or ['(none)'])[-1].strip()[:200]}")
    elif rc:
        oom = "out of memory" in text.lower() or "OutOfMemoryError" in text
        record |= dict(status="out of memory" if oom else "failed",
                       error=f"exit {rc}: {last_words(text)}" if rc > 0 else
                       f"killed by signal {-rc}: {last_words(text)}")
    else:
        record |= dict(status="ok", **json.loads((a.work / f"{check_id}.json").read_text()))
    record["log_tail"] = lines[-40:]
    return record


def command(a, check_id: str) -> str:
    words = ["python", "bench/gpu_check.py", "--parts", check_id] + ["--dry-run"] * a.dry_run
    return shlex.join(words + (["--tokenizer", a.tokenizer_arg] if a.tokenizer_arg else []))


def table(report: dict) -> str:
    """The report as markdown: a line on the machine and versions, then one row per figure."""
    e, dry = report["env"], report["dry_run"]
    where = "CPU dry-run (tiny shapes, fp32: not GPU figures)" if dry else \
        f"{e.get('gpu')} ({e.get('gpu_memory_gib')} GiB, compute capability {e.get('capability')})"
    lines = [f"GPU check on {where}: torch {e.get('torch')}, CUDA {e.get('cuda')}, cuDNN "
             f"{e.get('cudnn')}, transformers {e.get('transformers')}; {report['date']}, "
             f"{report['wall_s']:.0f} s of --budget {report['budget_s']:g}", "",
             "| part | check | result | s | command |", "|---|---|---|---|---|"]
    for c in report["checks"]:
        for r in c["rows"]:
            cells = [c["part"], r["what"], r["result"], f"{c['seconds']:.0f}",
                     f"`{c['command']}`"]
            lines.append("| " + " | ".join(x.replace("|", "\\|") for x in cells) + " |")
    return "\n".join(lines)


def parent(a) -> dict:
    """Runs the chosen checks, most needed first, each under its time guard; the report."""
    t0 = time.perf_counter()
    write_inputs(a)
    env = run_child(a, "env", guard=min(120, a.budget))
    if env["status"] != "ok":
        sys.exit(f"error: {env['error']}")
    chosen = sorted((c for c in CHECKS if any(c.id == p or c.id.startswith(p + "-")
                                              for p in a.parts)), key=lambda c: c.priority)
    left = a.budget - (time.perf_counter() - t0)
    planned = {c.id: c.weight / sum(x.weight for x in chosen) * left for c in chosen}
    records = {}
    for i, c in enumerate(chosen):
        left = a.budget - (time.perf_counter() - t0)
        guard = left - sum(planned[x.id] for x in chosen[i + 1:])  # its share + what is unused
        print(f"[{i + 1}/{len(chosen)}] {c.id}: up to {guard:.0f} s ...", file=sys.stderr,
              flush=True)
        if guard < 1:
            r = dict(id=c.id, status="skipped", seconds=0.0, guard_s=round(guard, 1),
                     error=f"skipped: {max(left, 0):.0f} s of --budget {a.budget:g} left")
        else:
            r = run_child(a, c.id, guard)
        print(f"    {r['status']} in {r['seconds']:.0f} s" +
              (f": {r['error']}" if r["error"] else ""), file=sys.stderr, flush=True)
        records[c.id] = r
        report = make_report(a, env, records, time.perf_counter() - t0)
        a.json.write_text(json.dumps(report, indent=1))  # after every check: a run cut short
    return report  # by an outer timeout keeps what it finished


def make_report(a, env: dict, records: dict, wall: float) -> dict:
    """The records in the table's order, each with its part, its command and its rows."""
    checks = []
    for c in [c for c in CHECKS if c.id in records]:
        r = records[c.id] | dict(part=c.id.split("-")[0], command=command(a, c.id))
        rows = r.get("rows") or [dict(result=f"**{r['status'].upper()}**: {r['error']}")]
        mark = "CPU dry-run: " if a.dry_run else ""
        r["rows"] = [dict(what=x.get("what", c.what), result=mark + x["result"]) for x in rows]
        checks.append(r)
    return dict(dry_run=a.dry_run, env=env["figures"], date=time.strftime("%Y-%m-%d %H:%M"),
                budget_s=a.budget, wall_s=round(wall, 1), checks=checks)


def write_inputs(a) -> None:
    """WORK/rows.jsonl (40 math rows for the pipeline) and, without --tokenizer, a word-level
    tokenizer as train.py makes the toy's, over the rows' words and Qwen3's special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    rows = math_rows(40)
    (a.work / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if a.tokenizer:
        return
    words = {w for r in rows for w in (r["question"] + " " + r["generation"]).split()}
    words = sorted((words | {"user", "assistant", "system"}) - set(SPECIALS))
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<unk>"] + words)}, "<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIALS)  # matched whole before the split: the chat format works
    a.tokenizer = a.work / "tokenizer"
    a.tokenizer.mkdir(exist_ok=True)
    tok.save(str(a.tokenizer / "tokenizer.json"))


# ----------------------------------------------------------------------------- flags

def positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of seconds above 0")
    return value


def part(text: str) -> str:
    if not any(c.id == text or c.id.startswith(text + "-") for c in CHECKS):
        raise argparse.ArgumentTypeError(
            f"{text!r} names no check; give a part (stage1, attention, decode, pipeline) or a "
            f"check id ({', '.join(c.id for c in CHECKS)})")
    return text


def tokenizer_dir(text: str) -> str:
    if not (Path(text) / "tokenizer.json").is_file():
        raise argparse.ArgumentTypeError(f"{text}: no tokenizer.json there; give the folder "
                                          "that holds Qwen3's tokenizer.json")
    return text


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=train.Help)
    p.add_argument("--dry-run", action="store_true",
                   help="the same checks at tiny shapes, fp32, on the CPU (figures not a GPU's)")
    p.add_argument("--parts", nargs="+", type=part, default=["stage1", "attention", "decode",
                                                             "pipeline"],
                   help="parts or check ids to run")
    p.add_argument("--budget", type=positive, default=480.0,
                   help="seconds for all the checks; each gets a share as its time guard")
    p.add_argument("--json", help="where to write the report (default runs/gpu_check.json; "
                   "runs/gpu_check-dry-run.json with --dry-run)")
    p.add_argument("--tokenizer", type=tokenizer_dir,
                   help="folder with a Qwen3 tokenizer.json (default: a word-level one made here)")
    p.add_argument("--work", help="folder for the models, logs and runs, kept (default: a "
                   "temporary one, removed at the end)")
    p.add_argument("--child", choices=list(BY_ID), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.tokenizer_arg = a.tokenizer  # as given, for the commands in the table
    a.tokenizer = a.tokenizer and Path(a.tokenizer).resolve()  # the checks run in the repository
    a.json = Path(a.json or f"runs/gpu_check{'-dry-run' * a.dry_run}.json")
    return a


def main() -> None:
    a = parse_args()
    if a.child:
        return child(a)
    try:
        a.json.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        sys.exit(f"error: --json {a.json}: cannot make its folder ({e.strerror}); give a path "
                 "you can write to")
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        a.work = Path(a.work or tmp).resolve()
        a.work.mkdir(parents=True, exist_ok=True)
        report = parent(a)
    print(table(report))
    print(f"\n(the same as JSON: {a.json})", file=sys.stderr)


if __name__ == "__main__":
    main()
