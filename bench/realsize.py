"""`train.py --size 0.6b` and `--size 1.7b` at the published shapes, checked in one command.

    python bench/realsize.py                     # a CUDA GPU: every check, bf16, ~8 minutes
    python bench/realsize.py --tokenizer DIR     # no GPU: the CPU rehearsal and the memory fit
    python bench/realsize.py --dry-run           # the GPU checks' code, tiny shapes, on the CPU
    python bench/realsize.py --table             # the README's memory table, from the stored fit
    python bench/realsize.py --parts stage1 attention    # some parts, or single checks by id

The models are random Qwen3s at the published shapes; nothing downloads. Each check runs in its
own process under a time guard (its share of --budget, plus what the earlier ones left), the
most needed first: an out-of-memory, a crash or a hang is a row of the table. On a GPU (bf16):
  stage1-*   stage-1 steps by train.py's own train_step and lm_loss, ~15% of the tokens
             iterating or all (AlwaysThink): the CUDA allocator's peak per phase, tokens/s
  attention  which SDPA kernel takes tah's duo-causal call; each backend alone: time, memory
  decode-*   tah.generate against transformers' generate, same weights, greedy; TaH decoding
             with a share p of the steps iterating
  pipeline   python train.py --size 0.6b end to end on 40 math rows, then generate.py
Without a GPU, the CPU rehearsal (Qwen3's tokenizer: --tokenizer DIR with its tokenizer.json and
tokenizer_config.json; ~15 minutes on 2 idle cores, 12 GB): the pipeline at the 0.6B shape, then
memory-*: stage-1 steps at 128-768 tokens, fp32 and CPU bf16 autocast, the peak resident memory
per phase, and the estimator fitted to them. The table (markdown) goes to stdout, the same as
JSON to --json. For tests, REALSIZE_FAULT="ID=raise" (or "ID=oom", "ID=hang") fails check ID.
"""
from __future__ import annotations

import argparse, json, os, random, re, shlex, shutil, signal, statistics, subprocess  # noqa: E401
import sys, tempfile, time, warnings  # noqa: E401
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

import tah  # noqa: E402
import train  # noqa: E402
from bench import common  # noqa: E402
from bench.common import GIB, gib  # noqa: E402

HARD = 0.15  # share of the tokens that iterate in stage 1, as in the paper's oracle labels
# a byte-level BPE with Qwen3's special tokens: the default tokenizer where Qwen3's is not given
BPE = ROOT / "tests" / "fixtures" / "official-tiny"
# The published shapes (config.json of Qwen/Qwen3-0.6B-Base and -1.7B-Base), and the dry run's
SHAPES = {"0.6b": tah.Qwen3Config(),
          "1.7b": tah.Qwen3Config(hidden_size=2048, intermediate_size=6144)}
TINY = {"0.6b": dict(hidden_size=64, intermediate_size=128),
        "1.7b": dict(hidden_size=96, intermediate_size=192)}
TINY_LAYOUT = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   max_position_embeddings=1024, torch_dtype="float32")
PHASES = ["forward", "logits", "layers", "optimizer"]  # of a step, as stage1_step marks them
CHUNK_RUN, HELD_OUT = (256, 64), 768  # the CPU rehearsal's small-chunk run and held-out length


class Setting:
    """Where and at what size a check runs: "gpu" (CUDA, bf16, the published sizes), "cpu" (the
    rehearsal: the 0.6B size, fp32 or CPU bf16 autocast as each check says) or "dry" (the GPU
    checks on the CPU in fp32 at tiny sizes, 1 thread). All that differs between them is here."""

    def __init__(self, mode: str, work, tokenizer, threads: int = 0):
        self.mode, self.dry, self.work = mode, mode == "dry", Path(work)
        self.tokenizer, self.threads = Path(tokenizer), 1 if mode == "dry" else threads
        self.device = torch.device("cuda" if mode == "gpu" else "cpu")
        self.memory = common.Memory(self.device)
        self.dtype = torch.float32 if self.dry else torch.bfloat16  # of the models, saved and run
        self.shrink = 64 if self.dry else 1  # lengths: 4096 tokens -> 64 in the dry run
        self.steps = dict(gpu=5, cpu=1, dry=3)[mode]  # stage-1 steps a check takes
        self.decode_len = 16 if self.dry else 256  # prompt tokens, and new tokens, of decoding
        self.repeats = 2 if self.dry else 5  # timed repeats of an attention call

    def amp(self):
        return torch.autocast(self.device.type, torch.bfloat16, enabled=not self.dry)

    def config(self, shape: str) -> tah.Qwen3Config:
        if not self.dry:
            return SHAPES[shape]
        from tokenizers import Tokenizer  # the dry run's vocabulary: the tokenizer's, rounded up
        vocab = Tokenizer.from_file(str(self.tokenizer / "tokenizer.json")).get_vocab_size()
        return tah.Qwen3Config(vocab_size=-(-vocab // 64) * 64, **TINY_LAYOUT, **TINY[shape])

def random_model(s: Setting, shape: str) -> Path:
    """A random Qwen3 of `shape` (common.spread's weights) with the tokenizer, saved by the
    first check that needs it and reused by the others."""
    d = s.work / f"qwen3-{shape}{'-tiny' * s.dry}-random"
    if not (d / "config.json").exists():
        torch.manual_seed(0)
        with torch.device(s.device):
            model = common.spread(tah.TaH(s.config(shape))).to(s.dtype)
        tah.save(model, d, tokenizer_dir=s.tokenizer)  # written whole or not at all
    return d

def math_rows(n: int, seed: int = 0) -> list[dict]:
    """n arithmetic word problems, each a worked <think> trace of 1 to 16 steps and a \\boxed{}
    answer: with Qwen3's chat format 70 to 230 tokens, so that --max-len 128 cuts some."""
    rng, rows = random.Random(seed), []
    for i in range(n):
        a, b, days = rng.randint(2, 99), rng.randint(2, 99), 2 + (i * 7) % 16
        steps = "\n".join(f"{a + (d - 1) * b}+{b}={a + d * b}" for d in range(1, days))
        rows.append(dict(question=f"A shop sells {a} pens on day 1 and {b} more each day. How "
                                  f"many after {days} days?", generation=f"<think>\nAdd {b} per "
                         f"day.\n{steps}\n</think>\n\n{a}+{days - 1}*{b}={a + (days - 1) * b}, so "
                         f"the answer is \\boxed{{{a + (days - 1) * b}}}."))
    return rows

def random_rows(vocab: int, tokens: int, n: int, share: float) -> tuple[dict, torch.Tensor]:
    """n random rows of `tokens` tokens in train.py's data layout (a prompt of 1/8, then the
    scored response) and their oracle passes, flat as train.compute_labels writes them: 2 at
    round(share x tokens) response positions of each row but its last (which predicts nothing),
    or, for share 1 (AlwaysThink), at every position."""
    g, start = torch.Generator().manual_seed(tokens), tokens // 8
    labels = torch.full((n, tokens), 1 + (share >= 1), dtype=torch.uint8)
    for r in range(n if share < 1 else 0):
        hard = torch.randperm(tokens - 1 - start, generator=g)[:round(share * tokens)]
        labels[r, start + hard] = 2
    data = dict(ids=torch.randint(0, vocab, (n * tokens,), generator=g).int(),
                target=(torch.arange(tokens) >= start).to(torch.uint8).repeat(n),
                offsets=torch.arange(n + 1) * tokens, start=torch.full((n,), start),
                train=torch.arange(n), held=torch.arange(0))
    return data, labels.flatten()


# ----------------------------------------------------------------------------- 1. stage 1

def stage1_step(s: Setting, shape: str, tokens: int, policy: str = "oracle",
                dtype: str | None = None, chunk: int | None = None) -> dict:
    """s.steps stage-1 steps of one row of `tokens` tokens by train.py's own functions: the
    model as stage 1 loads it (fp32 weights, a fresh LoRA, gradient checkpointing), then
    train.train_step on train.lm_loss(model, batch, "oracle") under `dtype` autocast (default:
    the setting's), with train.CE_CHUNK set to `chunk`. "oracle": ~15% of the tokens iterate;
    "always": all. Gradients and AdamW's moments exist before each step, as for every
    micro-batch of a step but the first. Returns the bytes in use (resident on a CPU, CUDA's
    allocated on a GPU) at the start, with the weights, with gradients and moments (fixed), and
    each phase's peak over the steps: forward (with the loss), logits (backward until the last
    layer is recomputed), layers (the rest of backward, clipping), optimizer (the update)."""
    mem, dtype = s.memory, dtype or str(s.dtype).removeprefix("torch.")
    train.CE_CHUNK = chunk or train.CE_CHUNK
    d, out = random_model(s, shape), s.work / f"stage1-{shape}-{tokens}-{policy}"
    data, labels = random_rows(s.config(shape).vocab_size, tokens, s.steps,
                               HARD if policy == "oracle" else 1.0)
    run = train.Run(train.parse_args(
        ["--size", shape, "--model", str(d), "--reference", str(d), "--out", str(out), "--max-len",
         str(tokens), "--batch", "1", "--no-resume", "--device", s.device.type, "--dtype", dtype,
         "--threads", str(s.threads)] + ["--decider-layers", "0", "1"] * s.dry))
    r = dict(start=mem.now())
    model = train.load_model(run, d, train.tah_parts(run.args, decider=False)).train()
    model.grad_checkpointing = True
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=run.args.lr, weight_decay=run.args.weight_decay)
    r |= dict(params=sum(p.numel() for p in params), weights=mem.now())
    for p in params:  # AdamW makes its two moments in its first step: one on zero gradients
        p.grad = torch.zeros_like(p)
    opt.step()
    r["fixed"], peaks, marks, seconds = mem.now(), dict.fromkeys(PHASES, 0), [], []

    def end(phase: str) -> None:  # the peak since the last mark, then a fresh start
        peaks[phase] = max(peaks[phase], mem.peak())
        marks.append(phase)
        mem.mark()

    def loss(model, batch):
        out = train.lm_loss(model, batch, "oracle")
        end("forward")
        return out
    # backward recomputes the last layer first (its checkpoint): the logits phase ends there
    model.model.layers[-1].register_forward_pre_hook(
        lambda *_: end("logits") if marks[-1:] == ["forward"] else None)
    opt.register_step_pre_hook(lambda *_: end("layers"))
    opt.register_step_post_hook(lambda *_: end("optimizer"))
    for step in range(s.steps):
        for p in params:
            p.grad = torch.zeros_like(p)  # as between micro-batches (train_step frees them)
        batch = train.make_batch(data, torch.tensor([step]), labels, s.device)
        mem.mark()
        seconds.append(common.timed(lambda: train.train_step(run, model, opt, [batch], loss, step),
                                    mem.sync)[0])
    shutil.rmtree(out, ignore_errors=True)
    return r | peaks | dict(
        peak=max(peaks.values()), reserved=mem.reserved(), length=tokens, chunk=train.CE_CHUNK,
        seconds=statistics.median(seconds[1:] or seconds), bf16=dtype == "bfloat16",
        hard=int((labels[:tokens] == 2).sum()), shape=shape, policy=policy, steps=s.steps)

def check_stage1(s: Setting, shape: str, tokens: int, policy: str = "oracle", dtype=None,
                 chunk=None, role=None) -> dict:
    """stage1_step at tokens // s.shrink tokens; on a GPU with the stored fit's estimate."""
    f = stage1_step(s, shape, tokens // s.shrink, policy, dtype, chunk) | dict(role=role)
    f |= dict(iterating=f["hard"] / f["length"], tokens_per_second=f["length"] / f["seconds"])
    if s.mode == "gpu":
        parts = tah.TaHConfig(lora_r=train.SIZES[shape].get("lora_r", 16))
        f["estimate"] = peak_memory_bytes(SHAPES[shape], parts, f["length"], 1, torch.bfloat16,
                                          f["iterating"])
    return dict(figures=f, rows=[dict(result=(
        f"{f['length']} tokens, {f['iterating']:.1%} iterating, "
        f"{'bf16 autocast' if f['bf16'] else 'fp32'}: peak {gib(f['peak'])} ("
        + ", ".join(f"{ph} {gib(f[ph])}" for ph in PHASES) + f"; fixed {gib(f['fixed'])})"
        + f", reserved {gib(f['reserved'])}" * (f["reserved"] is not None)
        + f", estimated {gib(f.get('estimate'))}" * ("estimate" in f)
        + f"; {f['tokens_per_second']:,.0f} tokens/s ({f['seconds']:.2f} s a step)"))])


# ----------------------------------------------------------------------------- 2. attention

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}

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

def check_attention(s: Setting) -> dict:
    """Each SDPA backend alone on tah's two calls of one layer (pass 1, pass 2) at 4096 tokens:
    accepted or refused (with PyTorch's reasons), forward+backward time (median ms), the largest
    difference from tah.attention_reference, and the memory pass 1's call adds at 4096 and 8192
    tokens (above its inputs); and which kernels PyTorch picks itself."""
    config = replace(s.config("0.6b"), num_hidden_layers=1, vocab_size=1024)  # one real layer
    torch.manual_seed(0)
    model = tah.TaH(config, tah.TaHConfig(lora_dropout=0.0)).to(s.device).eval()
    lengths = [4096 // s.shrink, 8192 // s.shrink]
    calls = sdpa_calls(s, model, lengths[0])
    q, k, _, mask, _ = calls[0]
    layout = (f"mask {tuple(mask.shape)}, {q.shape[1]} query / {k.shape[1]} kv heads of "
              f"{q.shape[-1]}, enable_gqa; q/k/v/mask "
              + "/".join(str(x.dtype).removeprefix("torch.") for x in calls[0][:4]))
    refs = [tah.attention_reference(*(x.float() for x in c[:3]), c[3]) for c in calls]

    def ms(c: tuple, backend: str | None = None) -> float:  # median, after a warm-up
        attend(s, c, backend)
        return 1e3 * statistics.median(common.timed(lambda: attend(s, c, backend), s.memory.sync)[0]
                                       for _ in range(s.repeats))

    def adds(c: tuple, backend: str) -> int | str:  # bytes above its inputs
        base = s.memory.mark()
        try:
            attend(s, c, backend)
        except torch.OutOfMemoryError:
            return "out of memory"
        return s.memory.peak() - base
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for c in calls:
            attend(s, c)
    ops = [e.key for e in prof.key_averages() if "scaled_dot_product_" in e.key]  # aten's kernels
    chosen, t = [name for name in BACKENDS if any(name in op for op in ops)], [ms(c) for c in calls]
    figures = dict(tokens=lengths[0], layout=layout, default=chosen, backends={})
    rows = [dict(what="SDPA kernel PyTorch picks for tah's call",
                 result=f"{'/'.join(chosen) or 'unknown'}: {sum(t):.2f} ms forward+backward per "
                        f"layer at {lengths[0]} tokens (pass 1 {t[0]:.2f}, pass 2 {t[1]:.2f}); "
                        f"{layout}")]
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
        t = [ms(c, name) for c in calls]
        extra = [adds(calls[0], name), adds(sdpa_calls(s, model, lengths[1])[0], name)]
        agrees = diff <= (1e-4 if s.dry else 5e-2)  # fp32, or bf16 against an fp32 reference
        figures["backends"][name] = dict(accepted=True, agrees=agrees, ms=t, max_diff=diff,
                                         extra_bytes=dict(zip(lengths, extra)))
        rows.append(dict(what=f"SDPA backend {name} alone", result=(
            f"accepted{'' if agrees else ' but WRONG'}: {sum(t):.2f} ms forward+backward per "
            f"layer (pass 1 {t[0]:.2f}, pass 2 {t[1]:.2f}); max |diff| from attention_reference "
            f"{diff:.1e}; pass 1's call adds "
            + ", ".join(f"{gib(x)} at {n}" for n, x in zip(lengths, extra)))))
    return dict(figures=figures, rows=rows)


# ----------------------------------------------------------------------------- 3. decoding

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
    batch 1 and 16 (common.decode_vs_transformers: a 4-token warm-up each, one timed run); then
    TaH decoding at batch 1 with a share p = 0, 0.1, 0.5 of the steps iterating."""
    from transformers import Qwen3ForCausalLM  # a test dependency: only this check needs it
    d, n, dev = random_model(s, shape), s.decode_len, s.device
    ours = tah.load(d, device=dev, dtype=s.dtype)
    dtype_kw = "dtype" if int(version("transformers").split(".")[0]) >= 5 else "torch_dtype"
    hf = Qwen3ForCausalLM.from_pretrained(d, **{dtype_kw: s.dtype}).to(dev).eval()
    g = torch.Generator().manual_seed(0)
    rows, figures = [], dict(shape=shape, prompt=n, new=n, batches={})
    for B in (1, 16):
        prompt = torch.randint(0, ours.config.vocab_size, (B, n), generator=g).to(dev)
        r = common.decode_vs_transformers(ours, hf, prompt, n, warmup=4)
        (t_ours,), (t_hf,) = r["tah"]["wall"], r["hf"]["wall"]
        words, first = agreement(*r["tokens"])
        figures["batches"][B] = dict(identical=first is None, first_mismatch=first,
                                     tah_tokens_per_s=B * n / t_ours, hf_tokens_per_s=B * n / t_hf)
        rows.append(dict(what=f"greedy decode {shape}, batch {B}, {n}-token prompt + {n} new: "
                              "tah.generate vs transformers",
                         result=f"{words}; {B * n / t_ours:,.0f} vs {B * n / t_hf:,.0f} tokens/s "
                                f"({t_hf / t_ours:.2f}x), prefill included"))
    del hf
    model = tah.add_parts(ours, tah.TaHConfig(lora_dropout=0.0))  # a LoRA for pass 2
    prompt = torch.randint(0, ours.config.vocab_size, (1, n), generator=g).to(dev)
    common.decode_seconds(model, prompt[:, :8], 8, common.forced_passes((1, 8), 0.5, 0).to(dev))
    speed = {p: n / common.decode_seconds(model, prompt, n, common.forced_passes(
        (1, n), p, 3).to(dev)) for p in (0.0, 0.1, 0.5)}
    figures["tah_decode_tokens_per_s"] = speed
    rows.append(dict(what=f"TaH decode {shape}, batch 1, {n} steps after {n} tokens, a share p "
                          "iterating, vs standard (p = 0)",
                     result=f"standard {speed[0.0]:,.1f} tokens/s; " + "; ".join(
                         f"p = {p}: {speed[p]:,.1f} ({speed[p] / speed[0.0]:.2f}x; "
                         f"1/(1+p) = {1 / (1 + p):.2f})" for p in (0.1, 0.5))))
    return dict(figures=figures, rows=rows)


# ----------------------------------------------------------------------------- 4. the pipeline

PIPELINE = ["--size", "0.6b", "--max-len", "128", "--steps", "2", "--decider-steps", "2",
            "--batch", "2", "--micro-batch", "1", "--eval-samples", "2", "--save-every", "0"]
CHECKPOINT = ["config.json", "model.safetensors", "tah_config.json", "decider.safetensors",
              "lora/adapter_model.safetensors"]

def script(*cmd: str) -> float:
    """`python cmd...` from the repository, its output into this check's log as it comes (a
    time guard's kill keeps it); its wall seconds, or an error naming what went wrong."""
    t, output = time.perf_counter(), []
    with subprocess.Popen([sys.executable, *cmd], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True) as p:
        for line in p.stdout:
            print(f"{time.perf_counter() - t:6.0f}s | {line}", end="", flush=True)
            output.append(line)
    if p.returncode:
        raise RuntimeError(f"{cmd[0]} exited {p.returncode}: {last_words(''.join(output))}")
    return time.perf_counter() - t

def check_pipeline(s: Setting) -> dict:
    """`python train.py --size 0.6b` as a user runs it, on the random 0.6B and the 40 rows (data,
    oracle labels, stage 1, stage 2, evaluation), then generate.py on what it wrote."""
    d, out = random_model(s, "0.6b"), s.work / "pipeline-run"
    shutil.rmtree(out, ignore_errors=True)
    flags = PIPELINE + ["--device", "cpu", "--dtype", "float32", "--threads", str(s.threads)] * (
        s.mode != "gpu") + ["--decider-layers", "0", "1", "2"] * s.dry
    wall = script("train.py", *flags, "--model", str(d), "--reference", str(d), "--data",
                  str(s.work / "rows.jsonl"), "--out", str(out))
    answer = script("generate.py", "--model", str(out / "tah"), "--max-new-tokens", "8",
                    "--greedy", "What is 2+3?")
    written = [f for f in CHECKPOINT if (out / "tah" / f).exists()]
    evaluated = list(json.loads((out / "eval.json").read_text())["tah"])
    figures = dict(seconds=wall, generate_seconds=answer, exit=0, checkpoint_written=written ==
                   CHECKPOINT, files=written, policies=evaluated)
    return dict(figures=figures, rows=[dict(result=(
        f"exit 0 in {wall:.0f} s (python train.py {' '.join(flags)}, 40 rows); checkpoint "
        f"written: {'yes' if written == CHECKPOINT else 'NO'} (tah/: {', '.join(written)}); "
        f"evaluated: {', '.join(evaluated)}; generate.py on it: {answer:.0f} s"))])


# --- the memory estimator (refit by the main session) ------------------------------------------
# For each phase of a step (forward, logits, layers) a line in the tokens T of the micro-batch:
#   peak = 16 P + extra + T * (L * (4 (1 + f) H + kvb * KV) + b V) + min(T, chunk) * c V
# 16 P: fp32 weights, gradients and two AdamW moments (P parameters). extra: what does not grow
# with T, in bytes per parameter for the forward (autocast keeps a bf16 copy of every weight it
# casts until the forward's autocast region ends) and in units of V H for the others (the (V, H)
# tied embedding's gradient buffers, the bf16 copy of lm_head that its backward keeps). Per
# token: each checkpointed layer keeps its fp32 input (the residual stream stays fp32 under
# autocast) for every pass a token gets (f = share of tokens with pass 2), and pass 1's keys and
# values (KV = kv heads x head_dim; fp32 k and v: kvb = 8; under autocast fp32 k and bf16 v: 6),
# which pass 2 attends to; b V is the (T, V) logits and their gradients; c V the fp32 internals
# of one cross-entropy chunk (at most 1024 positions). L, H, KV, V are theory (what autograd
# keeps); extra, b and c are fitted per phase. The step's peak is the largest phase, or the
# optimizer step's (16 P + a constant) if that is larger.
CHUNK = train.CE_CHUNK  # positions per fp32 CE chunk
STAGE1 = tah.TaHConfig(lora_r=16, lora_alpha=32, lora_dropout=0.1, input_topk=100)  # 0.6b's

def n_params(c: tah.Qwen3Config, lora_r: int) -> int:
    """Parameters of a tied Qwen3 with LoRA rank lora_r on its seven projections."""
    q, kv, H, I = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim, \
        c.hidden_size, c.intermediate_size
    layer = H * q + 2 * H * kv + q * H + 3 * H * I + 2 * H + 2 * c.head_dim
    lora = lora_r * ((H + q) + 2 * (H + kv) + (q + H) + 2 * (H + I) + (I + H))
    return c.vocab_size * H + c.num_hidden_layers * (layer + lora) + H

def layer_bytes(c: tah.Qwen3Config, f: float, kv_bytes: float) -> float:
    """Bytes per token the checkpointed layers keep: fp32 inputs of each pass, pass 1's K, V."""
    return c.num_hidden_layers * (4 * (1 + f) * c.hidden_size
                                  + kv_bytes * c.num_key_value_heads * c.head_dim)

def line_fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares intercept and slope."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope

def calibrate(runs: list[dict], chunked: dict | None, bf16: bool) -> dict:
    """Fits each phase's line to one dtype's runs (lengths <= 1024 with 1024-position CE chunks,
    and one run with small chunks: what it saves against the line is the chunk's memory for the
    positions it left out)."""
    c, f = SHAPES["0.6b"], sum(r["hard"] for r in runs) / sum(r["length"] for r in runs)
    V, H, P, runtime = c.vocab_size, c.hidden_size, runs[0]["params"], runs[0]["start"]
    k = dict(f=f, kv_bytes=6 if bf16 else 8, runtime=runtime)
    for ph in ("forward", "logits", "layers"):
        fixed, slope = line_fit([r["length"] for r in runs], [r[ph] for r in runs])
        ce = (fixed + slope * chunked["length"] - chunked[ph]) / (
            chunked["length"] - chunked["chunk"]) if chunked else 0.0
        extra = fixed - runtime - 16 * P
        k[ph] = dict(fixed=fixed, slope=slope, c=ce / V,
                     b=(slope - ce - layer_bytes(c, f, k["kv_bytes"])) / V,
                     extra=extra / P if ph == "forward" else extra / (V * H))
    k["optimizer"] = max(r["optimizer"] for r in runs) - runtime - 16 * P  # CPU AdamW: one
    return k  # tensor at a time

def predict(k: dict, c: tah.Qwen3Config, T: int, lora_r: int, f: float | None = None,
            chunk: int = CHUNK, gpu: bool = False) -> dict:
    """The calibrated peak of each phase (bytes, no runtime) for config c at T tokens; on a GPU
    the optimizer phase is 20 P: AdamW's foreach path makes one parameter-sized temporary."""
    f, V, P = k["f"] if f is None else f, c.vocab_size, n_params(c, lora_r)
    out = {}
    for ph in ("forward", "logits", "layers"):
        q = k[ph]
        extra = q["extra"] * P if ph == "forward" else q["extra"] * V * c.hidden_size
        out[ph] = 16 * P + extra + T * (layer_bytes(c, f, k["kv_bytes"]) + q["b"] * V) \
            + min(T, chunk) * q["c"] * V
    out["optimizer"] = 20 * P if gpu else 16 * P + k["optimizer"]
    out["peak"] = max(out.values())
    return out

def attention_scores(c: tah.Qwen3Config, T: int) -> float:
    """Bytes of (heads, T, T) fp32 score-sized buffers SDPA's math kernel holds in one layer's
    backward (scores, saved probabilities, their gradient): what a GPU pays if SDPA cannot take
    a mask with GQA."""
    return 3 * 4 * c.num_attention_heads * T * T  # pass 1's layers: T queries, T keys

def print_fit(records: list[dict]) -> None:
    """The estimator fitted per dtype to the memory runs (stage1_step's figures with a role:
    "fit", "chunk" (small CE chunks) or "held" (left out of the fit)): measured against
    predicted, the constants in MEMORY_PHASES's form, and the EXTRAPOLATION to one GPU."""
    runs = {b: [r for r in records if r["role"] == "fit" and r["bf16"] == b] for b in (0, 1)}
    chunked = {r["bf16"]: r for r in records if r["role"] == "chunk"}
    held, cal = [r for r in records if r["role"] == "held"], {}
    for bf16 in [b for b in (False, True) if len(runs[b]) >= 2]:
        k = cal[bf16] = calibrate(runs[bf16], chunked.get(bf16), bf16)
        print(f"\n== the estimator fitted to the {'bf16 autocast' if bf16 else 'fp32'} runs: f = "
              f"{k['f']:.3f}, runtime {k['runtime'] / GIB:.2f} GiB, optimizer 16 P + "
              f"{k['optimizer'] / GIB:.2f} GiB ==")
        for r in runs[bf16] + [chunked[bf16]] * (bf16 in chunked) + held * (not bf16):
            p = predict(k, SHAPES["0.6b"], r["length"], STAGE1.lora_r, r["hard"] / r["length"],
                        r["chunk"])["peak"] + k["runtime"]
            print(f"  {r['length']:5} tokens, chunk {r['chunk']:4}: measured {r['peak'] / GIB:6.2f}"
                  f" GiB, predicted {p / GIB:6.2f} GiB, {100 * (p / r['peak'] - 1):+5.1f}% "
                  + ("(HELD OUT of the fit)" if r["role"] == "held" else "(fitted)"))
        print(f"  MEMORY_PHASES[torch.{('float32', 'bfloat16')[bf16]}] = [" + ", ".join(
            f"({k[ph]['extra'] * (ph == 'forward'):.2f}, {k[ph]['extra'] * (ph != 'forward'):.2f}"
            f", {k[ph]['b']:.2f}, {k[ph]['c']:.2f})" for ph in ("forward", "logits", "layers"))
            + "]")
    for name, lora_r in (("0.6b", 16), ("1.7b", 32)) if True in cal else ():
        e = [predict(cal[True], SHAPES[name], T, lora_r, 0.15, gpu=True) for T in (4096, 8192)]
        print(f"EXTRAPOLATED {name}, one GPU, bf16, 4096 / 8192 tokens: " + " / ".join(
            f"{x['peak'] / GIB:.1f}" for x in e) + " GiB; if SDPA falls back to its math kernel "
            + " / ".join(f"{max(x['peak'], x['layers'] + attention_scores(SHAPES[name], T)) / GIB:.1f}"
                         for x, T in zip(e, (4096, 8192))))

# The constants calibrate() found on the project's 2-core CPU (one step at 128-768 tokens, fp32
# and bf16 autocast), from which the README's memory table comes. Per phase (forward, backward
# through the head, backward through the layers), on top of 16 bytes per parameter and each
# layer's per-token inputs and keys/values: (bytes per parameter, such as autocast's weight
# copies; (V, H)-sized gradient buffers of the tied embedding; bytes x V per token for the logits
# and their gradients; bytes x V per position of one cross-entropy chunk). AdamW's update: 20 P.
MEMORY_PHASES = {
    torch.float32: [(0.20, 0.0, 8.84, 5.09), (0.0, 3.98, 12.34, 2.99), (0.0, 24.18, 8.90, 0.30)],
    torch.bfloat16: [(2.19, 0.0, 9.01, 8.19), (0.0, 9.22, 13.21, 6.64), (0.0, 21.55, 5.79, 0.0)],
}
KV_BYTES = {torch.float32: 8, torch.bfloat16: 6}  # k fp32 and v in the autocast dtype, per element
HARD_SHARE = HARD  # tokens that iterate in stage 1

def peak_memory_bytes(config: tah.Qwen3Config, tah_config: tah.TaHConfig, tokens: int,
                      micro_batch: int, dtype: torch.dtype, share: float = HARD_SHARE) -> int:
    """Stage 1's estimated peak memory on micro-batches of `micro_batch` rows of `tokens` tokens,
    with a `share` of the tokens iterating (1 for AlwaysThink, 0 for Standard). The fit saw 15%;
    another share scales the per-token terms, which pass 2 repeats for its tokens."""
    with torch.device("meta"):
        params = sum(p.numel() for p in tah.TaH(config, tah_config).parameters())
    V, H, T = config.vocab_size, config.hidden_size, tokens * micro_batch
    kv = KV_BYTES[dtype] * config.num_key_value_heads * config.head_dim
    layers = config.num_hidden_layers * (4 * (1 + share) * H + kv)  # bytes per token
    scale = (1 + share) / (1 + HARD_SHARE)  # the logits and their gradients, pass 2's included
    phases = [params * (16 + extra) + vh * V * H + T * (layers + scale * per_v * V) +
              min(T, CHUNK) * chunk_v * V
              for extra, vh, per_v, chunk_v in MEMORY_PHASES[dtype]]
    return int(max(*phases, 20 * params))

def memory_table() -> None:
    """The README's memory table: stage 1 on one GPU under bf16 autocast, micro-batch 1, from the
    stored fit (an extrapolation from the CPU runs, not a GPU measurement)."""
    print("stage 1 on one GPU, bf16 autocast, micro-batch 1, 15% of the tokens iterating: "
          "estimated peak memory (GiB)\nmodel  16 bytes x params  4096 tokens  8192 tokens  "
          "(EXTRAPOLATED from CPU runs: CUDA context and allocator slack come on top)")
    for name, lora in (("0.6b", 16), ("1.7b", 32)):
        config, parts = SHAPES[name], tah.TaHConfig(lora_r=lora, lora_alpha=2 * lora)
        with torch.device("meta"):
            params = sum(p.numel() for p in tah.TaH(config, parts).parameters())
        print(f"{name:6} {16 * params / GIB:8.1f} ({params / 1e9:.2f}B)" + "".join(
            f"{peak_memory_bytes(config, parts, T, 1, torch.bfloat16) / GIB:13.1f}"
            for T in (4096, 8192)))
# --- end of the memory estimator ---------------------------------------------------------------


# ----------------------------------------------------------------------------- the checks

@dataclass
class Check:
    id: str
    what: str  # the row's name in the table
    weight: float  # its share of --budget
    run: Callable[[Setting], dict]  # -> {"figures": {...}, "rows": [{"result": words}, ...]}

def stage1(shape: str, tokens: int, policy: str, weight: float) -> Check:
    who = "every token iterating (AlwaysThink)" if policy == "always" else "~15% iterating"
    return Check(f"stage1-{shape}-{tokens}-{policy}", f"stage 1, {shape} shape, {tokens} tokens, "
                 f"{who}", weight, partial(check_stage1, shape=shape, tokens=tokens, policy=policy))

PIPELINE_CHECK = Check("pipeline", "python train.py --size 0.6b end to end", 70, check_pipeline)
GPU_CHECKS = [  # the order they run in: what the README needs most first
    stage1("0.6b", 4096, "oracle", 60), stage1("0.6b", 4096, "always", 45),
    Check("attention", "duo-causal attention: SDPA kernels", 40, check_attention),
    Check("decode-0.6b", "decoding, 0.6b shape", 75, partial(check_decode, shape="0.6b")),
    PIPELINE_CHECK, stage1("0.6b", 8192, "oracle", 40), stage1("0.6b", 8192, "always", 40),
    Check("decode-1.7b", "decoding, 1.7b shape", 60, partial(check_decode, shape="1.7b")),
    stage1("1.7b", 4096, "oracle", 50)]

def cpu_checks(a) -> list[Check]:
    """The CPU rehearsal: the pipeline, then stage-1 steps at the 0.6B size: per dtype its
    lengths (the fit) and, where it has two, CHUNK_RUN (small CE chunks: what a chunk costs);
    last HELD_OUT tokens in fp32, left out of the fit, to compare with its prediction."""
    plan = [(T, None, b, "fit") for b, Ts in ((0, a.lengths), (1, a.bf16_lengths)) for T in Ts]
    plan += [(*CHUNK_RUN, b, "chunk") for b, Ts in ((0, a.lengths), (1, a.bf16_lengths))
             if len(Ts) > 1]
    plan = sorted(plan, key=lambda x: x[2]) + [(HELD_OUT, None, 0, "held")]
    return [replace(PIPELINE_CHECK, weight=200)] + [Check(
        f"memory-{('fp32', 'bf16')[b]}-{T}" + f"-chunk{c}" * (role == "chunk") + "-held" * (
            role == "held"), f"stage-1 step, 0.6b, {('fp32', 'bf16 autocast')[b]}, {role}",
        20 + T / 10, partial(check_stage1, shape="0.6b", tokens=T, dtype=("float32", "bfloat16")[
            b], chunk=c, role=role)) for T, c, b, role in plan]

def check_env(s: Setting) -> dict:
    try:  # only the decode checks need it (a test dependency)
        transformers = version("transformers")
    except PackageNotFoundError:
        transformers = "not installed"
    info = dict(torch=torch.__version__, cuda=torch.version.cuda, gpu=None,
                cudnn=torch.backends.cudnn.version(), transformers=transformers)
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info |= dict(gpu=p.name, gpu_memory_gib=round(p.total_memory / GIB, 1),
                     capability=f"{p.major}.{p.minor}")
    return dict(figures=info, rows=[])

def child(a) -> None:
    """One check in this process (REALSIZE_FAULT may make it fail); its result to WORK/ID.json."""
    s = Setting(a.mode, a.work, a.tokenizer, a.threads)
    if s.threads:
        torch.set_num_threads(s.threads)
    fault = dict(f.split("=", 1) for f in os.environ.get("REALSIZE_FAULT", "").split(",")
                 if "=" in f).get(a.child)
    if fault == "hang":
        time.sleep(3600)
    error = torch.OutOfMemoryError if fault == "oom" else RuntimeError  # "raise": a failure
    if fault:
        raise error(f"{a.child}: {fault} injected by REALSIZE_FAULT")
    checks = {c.id: c for c in GPU_CHECKS + cpu_checks(a)} | {"env": Check("env", "", 0, check_env)}
    (s.work / f"{a.child}.json").write_text(json.dumps(checks[a.child].run(s)))


# ----------------------------------------------------------------------------- the parent

def last_words(log: str) -> str:
    """The line of a log that says what went wrong: the exception, or else the last line."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    errors = [x for x in lines if re.search(r"(^|\| )(\w+\.)*\w*(Error|Exception)\b|error:", x)]
    return (errors or lines or ["(no output)"])[-1][:400]

def run_child(a, check_id: str, guard: float) -> dict:
    """Runs one check in a child process group, killed at `guard` seconds; its record."""
    cmd = [sys.executable, __file__, *a.argv, "--child", check_id, "--mode", a.mode, "--work",
           str(a.work), "--tokenizer", str(a.tokenizer)]
    log, t = a.work / f"{check_id}.log", time.perf_counter()
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
    seconds, text = time.perf_counter() - t, log.read_text(errors="replace")
    lines = [line for line in text.splitlines() if line.strip()]
    record = dict(id=check_id, seconds=round(seconds, 1), guard_s=round(guard, 1), error=None,
                  log_tail=lines[-40:])
    if rc is None:
        return record | dict(status="time guard", error=f"stopped by its time guard after "
                             f"{seconds:.0f} s (its share of --budget {a.budget:g}); its last "
                             f"output: {(lines or ['(none)'])[-1].strip()[:200]}")
    if rc:
        oom = "out of memory" in text.lower() or "OutOfMemoryError" in text
        return record | dict(status="out of memory" if oom else "failed", error=(
            f"exit {rc}" if rc > 0 else f"killed by signal {-rc}") + f": {last_words(text)}")
    return record | dict(status="ok", **json.loads((a.work / f"{check_id}.json").read_text()))

def table(report: dict) -> str:
    """The report as markdown: a line on the machine and versions, then one row per figure."""
    e = report["env"]
    where = dict(dry="CPU dry-run (tiny shapes, fp32: not GPU figures)", cpu="the CPU rehearsal "
                 "(0.6B shape, CPU: not GPU figures)").get(report["mode"], (
                     f"{e.get('gpu')} ({e.get('gpu_memory_gib')} GiB, compute capability "
                     f"{e.get('capability')})"))
    lines = [f"realsize on {where}: torch {e['torch']}, CUDA {e['cuda']}, cuDNN {e['cudnn']}, "
             f"transformers {e['transformers']}; {report['date']}, {report['wall_s']:.0f} s of "
             f"--budget {report['budget_s']:g}", "", "| part | check | result | s | command |",
             "|---|---|---|---|---|"]
    for c in report["checks"]:
        for r in c["rows"]:
            cells = [c["part"], r["what"], r["result"], f"{c['seconds']:.0f}", f"`{c['command']}`"]
            lines.append("| " + " | ".join(x.replace("|", "\\|") for x in cells) + " |")
    return "\n".join(lines)

def parent(a, env: dict) -> dict:
    """Runs the chosen checks in order, each under its time guard (its share of what is left
    of --budget plus what the earlier ones left unused); the report, written after each."""
    t0, checks = time.perf_counter(), GPU_CHECKS if a.mode != "cpu" else cpu_checks(a)
    chosen = [c for c in checks if any(c.id == p or c.id.startswith(p + "-") for p in a.parts)]
    if not chosen:
        sys.exit(f"error: --parts {' '.join(a.parts)}: none of these checks runs here; the "
                 f"checks here: {', '.join(c.id for c in checks)}")
    planned = {c.id: c.weight / sum(x.weight for x in chosen) * a.budget for c in chosen}
    report = dict(mode=a.mode, env=env["figures"], date=time.strftime("%Y-%m-%d %H:%M"),
                  budget_s=a.budget, checks=[])
    for i, c in enumerate(chosen):
        left = a.budget - (time.perf_counter() - t0)
        guard = left - sum(planned[x.id] for x in chosen[i + 1:])  # its share + what is unused
        print(f"[{i + 1}/{len(chosen)}] {c.id}: up to {guard:.0f} s (log: {a.work / c.id}.log)",
              file=sys.stderr, flush=True)
        r = run_child(a, c.id, guard) if guard >= 1 else dict(
            id=c.id, status="skipped", seconds=0.0, guard_s=round(guard, 1),
            error=f"skipped: {max(left, 0):.0f} s of --budget {a.budget:g} left")
        print(f"    {r['status']} in {r['seconds']:.0f} s" + f": {r['error']}" * bool(r["error"]),
              file=sys.stderr, flush=True)
        words = ["python", "bench/realsize.py", "--parts", c.id] + ["--dry-run"] * (
            a.mode == "dry") + ["--tokenizer", a.tokenizer_arg] * bool(a.tokenizer_arg)
        rows = r.get("rows") or [dict(result=f"**{r['status'].upper()}**: {r['error']}")]
        mark = "CPU dry-run: " * (a.mode == "dry")
        report["checks"].append(r | dict(part=c.id.split("-")[0], command=shlex.join(words),
                                         rows=[dict(what=x.get("what", c.what),
                                                    result=mark + x["result"]) for x in rows]))
        report["wall_s"] = round(time.perf_counter() - t0, 1)
        a.json.write_text(json.dumps(report, indent=1))  # a run cut short keeps what it finished
    return report

# ----------------------------------------------------------------------------- flags

def part(text: str) -> str:
    if not text.startswith("memory") and not any(
            c.id == text or c.id.startswith(text + "-") for c in GPU_CHECKS):
        raise argparse.ArgumentTypeError(
            f"{text!r} names no check; give a part (stage1, attention, decode, pipeline, memory) "
            f"or a check id ({', '.join(c.id for c in GPU_CHECKS)}, memory-...)")
    return text

def tokenizer_dir(text: str) -> str:
    if not (Path(text) / "tokenizer.json").is_file():
        raise argparse.ArgumentTypeError(f"{text}: no tokenizer.json there; give the folder "
                                         "that holds Qwen3's tokenizer.json")
    return text

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=train.Help)
    add = p.add_argument
    add("--dry-run", action="store_true",
        help="the GPU checks at tiny shapes, fp32, on the CPU (figures not a GPU's)")
    add("--table", action="store_true", help="only print the memory table from the stored fit")
    add("--tokenizer", type=tokenizer_dir, help="folder with Qwen3's tokenizer.json (default: "
        "tests/fixtures/official-tiny's byte-level one; the CPU rehearsal needs Qwen3's)")
    add("--parts", nargs="+", type=part, default=["stage1", "attention", "decode", "pipeline",
                                                  "memory"], help="parts or check ids to run")
    add("--budget", type=train.POSITIVE, help="seconds for all the checks, each with a share as "
        "its time guard (default: 480, or 3600 for the CPU rehearsal)")
    add("--json", help="where to write the report (default runs/realsize.json; "
        "runs/realsize-dry-run.json with --dry-run)")
    add("--work", help="folder for the models, logs and runs, kept (default: a temporary one)")
    add("--threads", type=train.COUNT, default=0, help="CPU threads per check (0: torch's)")
    add("--lengths", type=train.POS_INT, nargs="+", default=[128, 256, 512],
        help="CPU rehearsal: tokens of the fp32 memory runs")
    add("--bf16-lengths", type=train.POS_INT, nargs="*", default=[128, 512],
        help="CPU rehearsal: tokens of the memory runs under bf16 autocast (none: skip them)")
    add("--child", help=argparse.SUPPRESS)
    add("--mode", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.argv = sys.argv[1:] if argv is None else list(argv)  # what the children are given too
    a.tokenizer_arg = a.tokenizer  # as given, for the commands in the table
    a.tokenizer = Path(a.tokenizer or BPE).resolve()  # the checks run in the repository
    a.json = Path(a.json or f"runs/realsize{'-dry-run' * a.dry_run}.json")
    return a

def main() -> None:
    a = parse_args()
    if a.child:
        return child(a)
    if a.table:
        return memory_table()
    try:
        a.json.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        sys.exit(f"error: --json {a.json}: cannot make its folder ({e.strerror}); give a path "
                 "you can write to")
    with tempfile.TemporaryDirectory(prefix="realsize-") as tmp:
        a.work, a.mode = Path(a.work or tmp).resolve(), "dry" if a.dry_run else "gpu"
        a.work.mkdir(parents=True, exist_ok=True)
        (a.work / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in math_rows(40)))
        env = run_child(a, "env", guard=120)
        if env["status"] != "ok":
            sys.exit(f"error: {env['error']}")
        if not a.dry_run and not env["figures"]["gpu"]:  # no GPU: the CPU rehearsal
            a.mode = "cpu"
            if not a.tokenizer_arg:
                sys.exit("error: no CUDA GPU here, and the CPU rehearsal needs --tokenizer DIR "
                         "(Qwen3's tokenizer.json); or give --dry-run, or --table")
        a.budget = a.budget or (3600 if a.mode == "cpu" else 480)
        report = parent(a, env)
        print(table(report))
        if a.mode == "cpu":
            print_fit([c["figures"] for c in report["checks"]
                       if c["status"] == "ok" and c["id"].startswith("memory")])
            print("\n== the stored fit (peak_memory_bytes) ==")
            memory_table()
    print(f"\n(the same as JSON: {a.json})", file=sys.stderr)


if __name__ == "__main__":
    main()
