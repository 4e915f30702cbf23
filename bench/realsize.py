"""`train.py --size 0.6b` and `--size 1.7b` at the published shapes, checked in one command.

    python bench/realsize.py                     # a CUDA GPU: every check, bf16, ~8 minutes
    python bench/realsize.py --tokenizer DIR     # no GPU: the CPU rehearsal and the memory fit
    python bench/realsize.py --dry-run           # the GPU checks' code, tiny shapes, on the CPU
    python bench/realsize.py --table             # the README's memory table, from the stored fit
    python bench/realsize.py --parts stage1 attention    # some parts, or single checks by id

On random Qwen3s, each check in its own process under a time guard (its share of --budget and
what the earlier ones left), the most needed first; an out-of-memory, a crash or a hang is a row
of the table. On a GPU: stage-1 steps (train.py's train_step and lm_loss: the CUDA allocator's
peak per phase, tokens/s), the SDPA kernel of the duo-causal call, decoding against transformers
and at an iterating share p, train.py --size 0.6b end to end. Without one, the CPU rehearsal
(DIR: Qwen3's tokenizer.json and tokenizer_config.json; 15 minutes, 12 GB): that pipeline at the
0.6B shape, stage-1 steps at 128-768 tokens (peak resident memory per phase), the fit to them.
Markdown to stdout, JSON to --json; REALSIZE_FAULT="ID=raise|oom|hang" fails a check (tests).
"""
from __future__ import annotations

import argparse, json, os, random, re, shlex, shutil, signal, statistics, subprocess  # noqa: E401
import sys, tempfile, time, warnings  # noqa: E401
from contextlib import nullcontext
from collections import namedtuple
from dataclasses import replace
from functools import partial
from importlib.metadata import version
from importlib.util import find_spec
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository: tah.py, train.py, bench/
sys.path.insert(0, str(ROOT))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

import tah  # noqa: E402
import train  # noqa: E402
from bench.measure import GIB, Memory, decode_seconds, decode_vs_transformers, forced_passes, \
    gib, spread, timed  # noqa: E402

HARD = 0.15  # share of the tokens that iterate in stage 1, as in the paper's oracle labels
# a tiny Qwen3 with a byte-level BPE that has Qwen3's special tokens: the dry run's model and
# tokenizer, and the tokenizer of a GPU run without --tokenizer
BPE = ROOT / "tests" / "fixtures" / "official-tiny"
SHAPES = {"0.6b": tah.Qwen3Config(),  # config.json of Qwen/Qwen3-0.6B-Base and -1.7B-Base
          "1.7b": tah.Qwen3Config(hidden_size=2048, intermediate_size=6144)}
PHASES = ["forward", "logits", "layers", "optimizer"]  # of a step, as stage1_step marks them
CE_CHUNK = train.CE_CHUNK  # train.py's positions per LM-loss chunk, before a run sets another
# The CPU rehearsal's stage-1 steps (tokens, bf16 autocast, CE chunk, role): per dtype the fit's
# lengths, one with small CE chunks (what a chunk costs), and one held out of the fit.
MEMORY_RUNS = [(256, 1, None, "fit"), (512, 1, None, "fit"), (1024, 1, None, "fit"),
               (1024, 1, 256, "chunk"), (2048, 1, None, "held"), (256, 0, None, "fit"),
               (1024, 0, None, "fit"), (1024, 0, 256, "chunk")]


class Setting:
    """All that differs between "gpu" (CUDA, bf16, the published sizes), "cpu" (the rehearsal:
    the 0.6B size, fp32 or CPU bf16 autocast) and "dry" (the GPU checks on the CPU, tiny, fp32)."""

    def __init__(self, mode: str, work, tokenizer):
        self.mode, self.dry, self.work = mode, mode == "dry", Path(work)
        self.tokenizer, self.threads = Path(tokenizer), int(mode == "dry")  # 0: torch's
        self.device = torch.device("cuda" if mode == "gpu" else "cpu")
        self.memory = Memory(self.device)
        self.dtype = torch.float32 if self.dry else torch.bfloat16  # of the models, saved and run
        self.amp = partial(torch.autocast, self.device.type, torch.bfloat16, enabled=not self.dry)
        self.shrink = 64 if self.dry else 1  # lengths: 4096 tokens -> 64 in the dry run
        self.steps = dict(gpu=5, cpu=1, dry=3)[mode]  # stage-1 steps a check takes
        self.decode_len = 16 if self.dry else 256  # prompt tokens, and new tokens, of decoding

    def config(self, shape: str) -> tah.Qwen3Config:  # the dry run's: 2 of BPE's 4 layers
        width = 64 if shape == "0.6b" else 96  # BPE's, or wider
        tiny = dict(num_hidden_layers=2, hidden_size=width, intermediate_size=2 * width)
        return tah.qwen3_config(tah.read_json(BPE / "config.json") | tiny) if self.dry \
            else SHAPES[shape]

def random_model(s: Setting, shape: str) -> Path:  # spread's weights and s.tokenizer, saved once
    d = s.work / f"qwen3-{shape}{'-tiny' * s.dry}-random"
    if not (d / "config.json").exists():
        torch.manual_seed(0)
        with torch.device(s.device):
            model = spread(tah.TaH(s.config(shape))).to(s.dtype)
        tah.save(model, d, tokenizer_dir=s.tokenizer)  # written whole or not at all
    return d

def math_rows(n: int) -> list[dict]:
    """n word problems, each a worked <think> trace of 1 to 16 additions and a \\boxed{} answer:
    with Qwen3's tokenizer and chat format 70 to 230 tokens (--max-len 128 cuts some)."""
    rng, rows = random.Random(0), []
    for a, b, days in ((rng.randint(2, 99), rng.randint(2, 99), 2 + i * 7 % 16) for i in range(n)):
        steps = "".join(f"{a + d * b}+{b}={a + (d + 1) * b}\n" for d in range(days - 1))
        rows.append(dict(question=f"A shop sells {a} pens on day 1 and {b} more each day. How "
                         f"many after {days} days?", generation=f"<think>\nAdd {b} per day.\n"
                         f"{steps}</think>\n\n{a}+{days - 1}*{b}={a + (days - 1) * b}, so the "
                         f"answer is \\boxed{{{a + (days - 1) * b}}}."))
    return rows

def random_rows(vocab: int, tokens: int, n: int, share: float) -> tuple[dict, torch.Tensor]:
    """n rows in train.py's data layout (a prompt of 1/8, then the scored response) and flat
    passes: 2 at round(share x tokens) response positions but the last, or all for share 1."""
    g, start = torch.Generator().manual_seed(tokens), tokens // 8
    labels = torch.full((n, tokens), 1 + (share >= 1), dtype=torch.uint8)
    for r in range(n if share < 1 else 0):
        hard = torch.randperm(tokens - 1 - start, generator=g)[:round(share * tokens)]
        labels[r, start + hard] = 2
    return dict(ids=torch.randint(0, vocab, (n * tokens,), generator=g).int(), train=torch.arange(
        n), target=(torch.arange(tokens) >= start).to(torch.uint8).repeat(n), held=torch.arange(0),
        offsets=torch.arange(n + 1) * tokens, start=torch.full((n,), start)), labels.flatten()


# ----------------------------------------------------------------------------- 1. stage 1

def stage1_step(s: Setting, shape: str, tokens: int, policy: str = "oracle",
                dtype: str | None = None, chunk: int | None = None) -> dict:
    """s.steps stage-1 steps of one row by train.py's own load_model, train_step and lm_loss
    (policy "oracle": ~15% of the tokens iterate; "always": all), under `dtype` autocast,
    train.CE_CHUNK set to `chunk`, gradients and AdamW's moments allocated before each step (as
    in a step's later micro-batches). Returns the bytes in use (resident on a CPU, CUDA's on a
    GPU) at the start, with the weights, with gradients and moments (fixed), and each phase's
    peak: forward (and loss), logits (backward to the last layer's recompute), layers, optimizer."""
    mem, dtype = s.memory, dtype or str(s.dtype).removeprefix("torch.")
    train.CE_CHUNK = chunk or CE_CHUNK  # train.py reads it at each call
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
        seconds.append(timed(lambda: train.train_step(run, model, opt, [batch], loss, step),
                             mem.sync)[0])
    shutil.rmtree(out, ignore_errors=True)
    return r | peaks | dict(
        peak=max(peaks.values()), reserved=mem.reserved(), length=tokens, chunk=train.CE_CHUNK,
        seconds=statistics.median(seconds[1:] or seconds), bf16=dtype == "bfloat16",
        hard=int((labels[:tokens] == 2).sum()), shape=shape, policy=policy, steps=s.steps)

def check_stage1(s: Setting, shape: str, tokens: int, role=None, **kw) -> dict:
    f = stage1_step(s, shape, tokens // s.shrink, **kw) | dict(role=role)
    f |= dict(iterating=f["hard"] / f["length"], tokens_per_second=f["length"] / f["seconds"])
    return dict(figures=f, rows=[dict(result=(
        f"{f['length']} tokens, {f['iterating']:.1%} iterating, "
        f"{'bf16 autocast' if f['bf16'] else 'fp32'}: peak {gib(f['peak'])} ("
        + ", ".join(f"{ph} {gib(f[ph])}" for ph in PHASES) + f"; fixed {gib(f['fixed'])})"
        + f", reserved {gib(f['reserved'])}" * (f["reserved"] is not None)
        + f"; {f['tokens_per_second']:,.0f} tokens/s ({f['seconds']:.2f} s a step)"))])


# ----------------------------------------------------------------------------- 2. attention

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}

def sdpa_calls(s: Setting, model: tah.TaH, tokens: int) -> list[tuple]:
    """What tah's Attention passes to SDPA in a forward of `tokens` tokens, ~15% iterating:
    [pass 1's ((q, k, v, mask), keywords) (T queries, T keys), pass 2's (T_d, T + T_d)]."""
    data, labels = random_rows(model.config.vocab_size, tokens, 1, HARD)
    b, calls, real = train.make_batch(data, torch.arange(1), labels, s.device), [], \
        F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        calls.append(((q, k, v, attn_mask), kw))
        return real(q, k, v, attn_mask=attn_mask, **kw)
    F.scaled_dot_product_attention = spy  # tah.py calls it through this module
    try:
        with torch.no_grad(), s.amp():
            model(b["ids"], b["passes"], valid=b["valid"])
    finally:
        F.scaled_dot_product_attention = real
    return calls

def attend(s: Setting, call: tuple, backend: str | None = None) -> torch.Tensor:
    """One forward and backward of a recorded call, autocast as in training, under one SDPA
    backend (None: PyTorch's choice); returns the output."""
    (q, k, v, mask), kw = call
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    with sdpa_kernel([BACKENDS[backend]]) if backend else nullcontext(), s.amp():
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kw)
    y.float().sum().backward()
    return y.detach()

def check_attention(s: Setting) -> dict:
    """The SDPA kernel PyTorch picks for tah's two calls of a layer at 4096 tokens, then each
    backend alone: refused (why) or its time and largest difference from attention_reference."""
    config = replace(s.config("0.6b"), num_hidden_layers=1, vocab_size=1024)  # one real layer
    torch.manual_seed(0)
    model = tah.TaH(config, tah.TaHConfig(lora_dropout=0.0)).to(s.device).eval()
    calls, tokens = sdpa_calls(s, model, 4096 // s.shrink), 4096 // s.shrink
    (q, k, v, mask), _ = calls[0]
    refs = [tah.attention_reference(*(x.float() for x in args[:3]), args[3]) for args, _ in calls]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for c in calls:
            attend(s, c)
    ops = [e.key for e in prof.key_averages() if "scaled_dot_product_" in e.key]  # aten's kernels
    figures = dict(tokens=tokens, default=[b for b in BACKENDS if any(b in op for op in ops)],
                   backends={}, layout=f"mask {tuple(mask.shape)} {mask.dtype}, {q.shape[1]} query "
                   f"/ {k.shape[1]} kv heads of {q.shape[-1]} in {q.dtype}, enable_gqa")
    rows = []
    for name in [None, *BACKENDS]:  # None: PyTorch's choice
        what = f"SDPA backend {name} alone" if name else "SDPA kernel PyTorch picks for tah's call"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:  # torch's max keeps a NaN (Python's may drop it)
                diff = float(torch.stack([(attend(s, c, name).float() - r).abs().max()
                                          for c, r in zip(calls, refs)]).max())
            except RuntimeError as e:  # "No available kernel": the warnings say why
                why = [re.sub(r"\s*\(Triggered internally at .*", "", str(w.message), flags=re.S)
                       for w in caught] + [str(e).splitlines()[0]]
                f = figures["backends"][name] = dict(accepted=False, reason=" ".join(
                    " ".join(dict.fromkeys(why)).split())[:400])
                rows.append(dict(what=what, result=f"refused: {f['reason']}"))
                continue
        t = [1e3 * statistics.median(timed(partial(attend, s, c, name), s.memory.sync)[0]
                                     for _ in range(3)) for c in calls]  # warm by now
        f = dict(accepted=True, ms=t, max_diff=diff, agrees=diff <= (1e-4 if s.dry else 5e-2))
        figures["backends"] |= {name: f} if name else {}  # bf16 against an fp32 reference
        rows.append(dict(what=what, result=(
            f"{'/'.join(figures['default']) or 'unknown'}: " if name is None else "accepted"
            f"{'' if f['agrees'] else ' but WRONG'}: ") + f"{sum(t):.2f} ms forward+backward "
            f"per layer at {tokens} tokens (pass 1 {t[0]:.2f}, pass 2 {t[1]:.2f}); max |diff| from"
            f" attention_reference {diff:.1e}" + f"; {figures['layout']}" * (name is None)))
    return dict(figures=figures, rows=rows)


# ----------------------------------------------------------------------------- 3. decoding

def check_decode(s: Setting, shape: str) -> dict:
    """tah.generate and transformers' generate on the same saved weights, greedy, batch 1 and 16
    (a 4-token warm-up, one timed run); TaH decoding with a share p = 0, 0.1, 0.5 iterating."""
    from transformers import Qwen3ForCausalLM  # a test dependency: only this check needs it
    d, n, dev = random_model(s, shape), s.decode_len, s.device
    ours = tah.load(d, device=dev, dtype=s.dtype)
    dtype_kw = "dtype" if int(version("transformers").split(".")[0]) >= 5 else "torch_dtype"
    hf = Qwen3ForCausalLM.from_pretrained(d, **{dtype_kw: s.dtype}).to(dev).eval()
    g, rows, figures = torch.Generator().manual_seed(0), [], dict(shape=shape, new=n, batches={})
    for B in (1, 16):
        prompt = torch.randint(0, ours.config.vocab_size, (B, n), generator=g).to(dev)
        r = decode_vs_transformers(ours, hf, prompt, n, warmup=4)
        (t_ours,), (t_hf,) = r["tah"]["wall"], r["hf"]["wall"]
        same = int((r["tokens"][0] == r["tokens"][1]).all(1).sum())  # rows with every token equal
        figures["batches"][B] = dict(identical_rows=same, tah_tokens_per_s=B * n / t_ours,
                                     hf_tokens_per_s=B * n / t_hf)
        rows.append(dict(what=f"greedy decode {shape}, batch {B}, {n}-token prompt + {n} new: "
                     "tah.generate vs transformers", result=f"tokens identical in {same} of {B} "
                     f"rows; {B * n / t_ours:,.0f} vs {B * n / t_hf:,.0f} tokens/s "
                     f"({t_hf / t_ours:.2f}x), prefill included"))
    del hf
    model = tah.add_parts(ours, tah.TaHConfig(lora_dropout=0.0))  # a LoRA for pass 2
    prompt = torch.randint(0, ours.config.vocab_size, (1, n), generator=g).to(dev)
    decode_seconds(model, prompt[:, :8], 8, forced_passes((1, 8), 0.5, 0).to(dev))  # warm-up
    speed = figures["tah_decode_tokens_per_s"] = {p: n / decode_seconds(
        model, prompt, n, forced_passes((1, n), p, 3).to(dev)) for p in (0.0, 0.1, 0.5)}
    rows.append(dict(what=f"TaH decode {shape}, batch 1, {n} steps after {n} tokens, a share p "
                     "iterating, vs standard (p = 0)", result=f"standard {speed[0.0]:,.1f} "
                     "tokens/s; " + "; ".join(f"p = {p}: {speed[p]:,.1f} ({speed[p] / speed[0]:.2f}"
                                              f"x; 1/(1+p) = {1/(1 + p):.2f})" for p in (.1, .5))))
    return dict(figures=figures, rows=rows)


# ----------------------------------------------------------------------------- 4. the pipeline

def script(*cmd: str) -> float:
    """Wall seconds of `python cmd...` run from the repository, its output into this check's
    log (a time guard's kill takes it too); a failure ends the check, its error in the log."""
    t = time.perf_counter()
    if subprocess.run([sys.executable, *cmd], cwd=ROOT).returncode:
        sys.exit(f"{cmd[0]} failed; its own words are above")
    return time.perf_counter() - t

def check_pipeline(s: Setting) -> dict:
    """`python train.py --size 0.6b` on the random 0.6B and 40 rows, then generate.py on it."""
    d, out = random_model(s, "0.6b"), s.work / "pipeline-run"
    shutil.rmtree(out, ignore_errors=True)
    flags = ["--size", "0.6b", "--max-len", "128", "--steps", "2", "--decider-steps", "2",
             "--batch", "2", "--micro-batch", "1", "--eval-samples", "2", "--save-every", "0",
             "--device", s.device.type, "--dtype", "bfloat16" if s.mode == "gpu" else "float32",
             "--threads", str(s.threads)] + ["--decider-layers", "0", "1", "2"] * s.dry
    wall = script("train.py", *flags, "--model", str(d), "--reference", str(d), "--data",
                  str(s.work / "rows.jsonl"), "--out", str(out))
    answer = None if s.dry else script(  # the dry run leaves it to the tests, for time
        "generate.py", "--model", str(out / "tah"), "--max-new-tokens", "8", "--greedy", "2+3?")
    written = sorted(str(f.relative_to(out / "tah")) for f in (out / "tah").rglob("*.*"))
    evaluated = list(json.loads((out / "eval.json").read_text())["tah"])
    return dict(figures=dict(seconds=wall, generate_seconds=answer, files=written,
                             policies=evaluated), rows=[dict(result=(
        f"exit 0 in {wall:.0f} s (python train.py {' '.join(flags)}, 40 rows), writing tah/: "
        f"{', '.join(written)}; evaluated: {', '.join(evaluated)}"
        + (f"; generate.py: {answer:.0f} s" if answer else "")))])


# --- the memory estimator (refit by the main session) ------------------------------------------
# One stage-1 step on a micro-batch of T tokens, a share f of them iterating, per phase (forward
# with the loss; backward through the loss chunks and the head; backward through the layers):
#   peak = 16 P + extra + T L a H (1 + f) / (1 + 0.15) + min(T, train.CE_CHUNK) c V
# 16 P: fp32 weights, gradients and AdamW's two moments. extra, what does not grow with T: in the
# forward, bytes per parameter (autocast's bf16 copy of each weight); in backward, in units of
# V H (the tied embedding's gradient buffers: their running sum, each use's own gradient, the
# dense gradients of the token lookup and of the soft-token mix). a: bytes per token, layer and
# hidden unit that the step keeps (each checkpointed layer's input, pass 1's keys and values,
# in backward the gradients of those keys that pass 2 sends back before pass 1 takes them, and
# one layer's recomputed activations). c: bytes per position and vocabulary entry of one chunk
# of logits (the logits, their fp32 copy, cross-entropy's buffers). extra, a and c are fitted per
# phase to the CPU runs: resident memory, with glibc told to give freed blocks back at once
# (MALLOC_MMAP_THRESHOLD_, else the freed blocks it keeps look like tensors). On a GPU the
# optimizer phase is 20 P (AdamW's foreach path: one temporary the size of the parameters).
PER_PHASE = PHASES[:3]

def n_params(c: tah.Qwen3Config, lora_r: int) -> int:
    """Parameters of stage 1's model: Qwen3 `c` with a LoRA of rank lora_r."""
    with torch.device("meta"):
        return sum(p.numel() for p in tah.TaH(c, tah.TaHConfig(lora_r=lora_r)).parameters())

def line_fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares intercept and slope."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope

def calibrate(fit: list[dict], chunk: dict) -> dict:
    """(extra, a, c) per phase from one dtype's runs: lines through the runs of up to CE_CHUNK
    tokens, and one run with smaller chunks, whose saving against the line is c V per position
    it left out of a chunk."""
    c, P, runtime = SHAPES["0.6b"], fit[0]["params"], fit[0]["start"]
    k = dict(runtime=runtime)
    for ph in PER_PHASE:
        fixed, slope = line_fit([r["length"] for r in fit], [r[ph] for r in fit])
        cv = (fixed + slope * chunk["length"] - chunk[ph]) / (chunk["length"] - chunk["chunk"])
        per = P if ph == "forward" else c.vocab_size * c.hidden_size  # extra's unit
        extra = (fixed - runtime - 16 * P) / per
        k[ph] = (extra, (slope - cv) / (c.num_hidden_layers * c.hidden_size), cv / c.vocab_size)
    return k

def predict(k: dict, c: tah.Qwen3Config, T: int, lora_r: int, share: float = HARD,
            chunk: int = CE_CHUNK) -> dict:
    """Each phase's peak (bytes, no runtime) for Qwen3 `c` at T tokens, by the constants k (per
    phase (extra, a, c)); "optimizer" is a GPU's 20 P, "peak" the largest."""
    P, V, H = n_params(c, lora_r), c.vocab_size, c.hidden_size
    out = {ph: 16 * P + extra * (P if ph == "forward" else V * H) + min(T, chunk) * cv * V
           + T * c.num_hidden_layers * a * H * (1 + share) / (1 + HARD)
           for ph, (extra, a, cv) in ((ph, k[ph]) for ph in PER_PHASE)}
    return out | dict(optimizer=20 * P, peak=max(max(out.values()), 20 * P))

def print_fit(records: list[dict]) -> None:
    """The constants fitted per dtype to the memory runs (role "fit", "chunk" or "held"), each
    run measured against predicted, and the table they give (EXTRAPOLATED to one GPU)."""
    for bf16 in (False, True):
        runs = [r for r in records if r["bf16"] == bf16]
        fit = [r for r in runs if r["role"] == "fit"]
        chunk = [r for r in runs if r["role"] == "chunk"]
        if len(fit) < 2 or not chunk:
            continue
        k = calibrate(fit, chunk[0])
        print(f"\n== {('fp32', 'bf16 autocast')[bf16]}: per phase (extra, a, c) " + "; ".join(
            f"{ph} ({', '.join(f'{x:.2f}' for x in k[ph])})" for ph in PER_PHASE))
        for r in runs:
            p = predict(k, SHAPES["0.6b"], r["length"], 16, r["hard"] / r["length"], r["chunk"])
            print(f"  {r['length']:5} tokens, chunk {r['chunk']:4} ({r['role']}): " + ", ".join(
                f"{ph} {r[ph] / GIB:.2f} measured, {(p[ph] + k['runtime']) / GIB:.2f} predicted"
                for ph in PER_PHASE))
        print(f"  MEMORY_PHASES[{('torch.float32', 'torch.bfloat16')[bf16]}] = dict(" + ", ".join(
            f"{ph}=({', '.join(f'{x:.2f}' for x in k[ph])})" for ph in PER_PHASE) + ")")
        for name, lora in (("0.6b", 16), ("1.7b", 32)) if bf16 else ():
            print(f"  EXTRAPOLATED {name} on one GPU: " + ", ".join(
                f"{T} tokens {predict(k, SHAPES[name], T, lora)['peak'] / GIB:.1f} GiB"
                for T in (4096, 8192, 10000)))

# The constants calibrate() found on the project's 2-core CPU (`python bench/realsize.py
# --tokenizer DIR`), per dtype and phase (forward, head, layers): (extra, a, c) as above. The
# README's memory table comes from the bf16 ones.
MEMORY_PHASES = {
    torch.float32: dict(forward=(0.22, 14.60, 8.00), logits=(12.87, 14.84, 0.03),
                        layers=(20.24, 31.71, 0.00)),
    torch.bfloat16: dict(forward=(2.21, 10.11, 7.98), logits=(6.42, 17.21, 8.93),
                         layers=(17.47, 20.33, -0.02)),
}
HARD_SHARE = HARD  # tokens that iterate in stage 1

def peak_memory_bytes(config: tah.Qwen3Config, tah_config: tah.TaHConfig, tokens: int,
                      micro_batch: int, dtype: torch.dtype, share: float = HARD_SHARE) -> int:
    """Stage 1's estimated peak memory on micro-batches of `micro_batch` rows of `tokens` tokens,
    a `share` of the tokens iterating (1 for AlwaysThink, 0 for Standard; the fit saw 15%)."""
    return int(predict(MEMORY_PHASES[dtype], config, tokens * micro_batch, tah_config.lora_r,
                       share)["peak"])

def memory_table() -> None:
    """The README's memory table: stage 1 on one GPU under bf16 autocast, micro-batch 1, from the
    stored fit (an extrapolation from the CPU runs, not a GPU measurement)."""
    print("stage 1 on one GPU, bf16 autocast, micro-batch 1, 15% of the tokens iterating: "
          "estimated peak (GiB)\nmodel  16 bytes x params  4096 tokens  8192 tokens  10000 tokens"
          "  (EXTRAPOLATED from CPU runs: the CUDA context and allocator slack come on top)")
    for name, lora in (("0.6b", 16), ("1.7b", 32)):
        config, parts = SHAPES[name], tah.TaHConfig(lora_r=lora, lora_alpha=2 * lora)
        P = n_params(config, lora)
        print(f"{name:6} {16 * P / GIB:8.1f} ({P / 1e9:.2f}B)" + "".join(
            f"{peak_memory_bytes(config, parts, T, 1, torch.bfloat16) / GIB:13.1f}"
            for T in (4096, 8192, 10000)))
# --- end of the memory estimator ---------------------------------------------------------------


# ----------------------------------------------------------------------------- the checks

# id: its part, then what sets it apart; weight: its share of --budget; run(setting) returns
# {"figures": {...}, "rows": [{"result": words, maybe "what": the row's name}, ...]}
Check = namedtuple("Check", "id weight run")

def stage1(shape: str, tokens: int, policy: str, weight: float) -> Check:  # policy: or "always"
    return Check(f"stage1-{shape}-{tokens}-{policy}", weight,
                 partial(check_stage1, shape=shape, tokens=tokens, policy=policy))

GPU_CHECKS = [  # the order they run in: what the README needs most first
    stage1("0.6b", 4096, "oracle", 60), stage1("0.6b", 4096, "always", 45),
    Check("attention", 40, check_attention), Check("decode-0.6b", 75, partial(check_decode,
    shape="0.6b")), Check("pipeline", 70, check_pipeline), stage1("0.6b", 8192, "oracle", 40),
    stage1("0.6b", 8192, "always", 40), Check("decode-1.7b", 60, partial(check_decode,
    shape="1.7b")), stage1("1.7b", 4096, "oracle", 50)]
CPU_CHECKS = [Check("pipeline", 200, check_pipeline)] + [Check(  # the CPU rehearsal
    f"memory-{('fp32', 'bf16')[b]}-{T}" + f"-chunk{c}" * bool(c) + "-held" * (role == "held"),
    20 + T / 10, partial(check_stage1, shape="0.6b", tokens=T, dtype=("float32", "bfloat16")[b],
                         chunk=c, role=role)) for T, b, c, role in MEMORY_RUNS]

def check_env(s: Setting | None) -> dict:  # s None: no CUDA here (the parent must not init it)
    p = torch.cuda.get_device_properties(0) if s and torch.cuda.is_available() else None
    return dict(rows=[], figures=dict(
        torch=torch.__version__, cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
        transformers=find_spec("transformers") and version("transformers"),  # for decode-*
        gpu=p and f"{p.name} ({p.total_memory / GIB:.1f} GiB, capability {p.major}.{p.minor})"))

def child(a) -> None:
    """One check in this process (REALSIZE_FAULT may make it fail); its result to WORK/ID.json."""
    s = Setting(a.mode, a.work, a.tokenizer)
    torch.set_num_threads(s.threads or torch.get_num_threads())
    fault = dict(f.split("=", 1) for f in os.environ.get("REALSIZE_FAULT", "").split(",") if f)
    time.sleep(3600 * (fault.get(a.child) == "hang"))
    error = torch.OutOfMemoryError if fault.get(a.child) == "oom" else RuntimeError  # or "raise"
    if a.child in fault:
        raise error(f"{a.child}: {fault[a.child]} injected by REALSIZE_FAULT")
    checks = {c.id: c for c in GPU_CHECKS + CPU_CHECKS} | {"env": Check("env", 0, check_env)}
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
                             env=os.environ | {"PYTHONUNBUFFERED": "1"} | (  # a killed one's log
                                 {"MALLOC_MMAP_THRESHOLD_": "65536"} if a.mode == "cpu" else {}),
                             start_new_session=True)  # its own group: train.py's goes with it
        try:
            rc = p.wait(timeout=guard)
        except subprocess.TimeoutExpired:
            rc = None
        finally:  # also on Ctrl-C: nothing of a check outlives the parent
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    seconds, text = time.perf_counter() - t, log.read_text(errors="replace")
    lines = [line for line in text.splitlines() if line.strip()] or ["(no output)"]
    r = dict(id=check_id, seconds=round(seconds, 1), guard_s=round(guard, 1), log_tail=lines[-40:])
    if rc is None:
        return r | dict(status="time guard", error=f"stopped by its time guard after {seconds:.0f}"
                        f" s (its share of --budget {a.budget:g}); last output: {lines[-1][:200]}")
    if rc:
        return r | dict(status="out of memory" if "out of memory" in text.lower() or
                        "OutOfMemoryError" in text else "failed", error=(f"exit {rc}" if rc > 0
                        else f"killed by signal {-rc}") + f": {last_words(text)}")
    return r | dict(status="ok", error=None, **json.loads((a.work / f"{check_id}.json").read_text(
        )))

def parent(a, env: dict, t0: float) -> dict:
    """Runs the chosen checks in order, each under its time guard (its share of what is left
    of --budget since t0 plus what the earlier ones left unused); the report, after each."""
    checks = CPU_CHECKS if a.mode == "cpu" else GPU_CHECKS
    chosen = [c for c in checks if any(c.id == p or c.id.startswith(p + "-") for p in a.parts)]
    if not chosen:
        sys.exit(f"error: --parts {' '.join(a.parts)}: no check of these runs here; here: "
                 f"{', '.join(c.id for c in checks)}")
    planned = {c.id: c.weight / sum(x.weight for x in chosen) * a.budget for c in chosen}
    report = dict(mode=a.mode, env=env["figures"], date=time.strftime("%Y-%m-%d %H:%M"),
                  budget_s=a.budget, checks=[])
    for i, c in enumerate(chosen):
        guard = a.budget - (time.perf_counter() - t0) - sum(planned[x.id] for x in chosen[i + 1:])
        print(f"[{i + 1}/{len(chosen)}] {c.id}: up to {guard:.0f} s (log: {a.work / c.id}.log)",
              end=" ... ", file=sys.stderr, flush=True)
        r = run_child(a, c.id, max(guard, 1))  # its share, and what the earlier ones left
        print(f"{r['status']} in {r['seconds']:.0f} s" + f": {r['error']}" * bool(r["error"]),
              file=sys.stderr, flush=True)
        words = ["python", "bench/realsize.py", "--parts", c.id] + ["--dry-run"] * (
            a.mode == "dry") + ["--tokenizer", a.tokenizer_arg] * bool(a.tokenizer_arg)
        rows = r.get("rows") or [dict(result=f"**{r['status'].upper()}**: {r['error']}")]
        report["checks"].append(r | dict(part=c.id.split("-")[0], command=shlex.join(words), rows=[
            x | dict(result="CPU dry-run: " * (a.mode == "dry") + x["result"]) for x in rows]))
        report["wall_s"] = round(time.perf_counter() - t0, 1)
        a.json.write_text(json.dumps(report, indent=1))  # a run cut short keeps what it finished
    return report


# ----------------------------------------------------------------------------- flags

def part(text: str) -> str:
    if not any(c.id == text or c.id.startswith(text + "-") for c in GPU_CHECKS + CPU_CHECKS):
        raise argparse.ArgumentTypeError(f"{text!r} names no check; give a part or check id: "
                                         + ", ".join(c.id for c in GPU_CHECKS + CPU_CHECKS[1:]))
    return text

def tokenizer_dir(text: str) -> str:
    if not (Path(text) / "tokenizer.json").is_file():
        raise argparse.ArgumentTypeError(f"{text}: no tokenizer.json there; give the folder "
                                         "that holds Qwen3's tokenizer.json")
    return text

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=train.Help)
    add = p.add_argument
    add("--dry-run", action="store_true", help="the GPU checks at tiny shapes, fp32, on the CPU")
    add("--table", action="store_true", help="only print the memory table from the stored fit")
    add("--tokenizer", type=tokenizer_dir, help="folder with Qwen3's tokenizer.json: needed on a "
        "CPU, else tests/fixtures/official-tiny's byte-level one (the dry run's, always)")
    add("--parts", nargs="+", type=part, default=["stage1", "attention", "decode", "pipeline",
                                                  "memory"], help="parts or check ids to run")
    add("--budget", type=train.POSITIVE, help="seconds for all the checks, each with a share as "
        "its time guard (default: 480, or 3600 for the CPU rehearsal)")
    add("--json", help="the report (default runs/realsize.json, or runs/realsize-dry-run.json)")
    add("--work", help="folder for the models, logs and runs, kept (default: a temporary one)")
    add("--child", help=argparse.SUPPRESS)
    add("--mode", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.argv = sys.argv[1:] if argv is None else list(argv)  # what the children are given too
    a.tokenizer_arg = None if a.dry_run else a.tokenizer  # as given, for the commands in the table
    a.tokenizer = Path(a.tokenizer_arg or BPE).resolve()  # the checks run in the repository
    a.json = Path(a.json or f"runs/realsize{'-dry-run' * a.dry_run}.json")
    return a

def main() -> None:
    a = parse_args()
    if a.child or a.table:
        return child(a) if a.child else memory_table()
    with tempfile.TemporaryDirectory(prefix="realsize-") as tmp:
        t0, a.work = time.perf_counter(), Path(a.work or tmp).resolve()
        a.mode = "dry" if a.dry_run else "gpu"  # "cpu" once the env check finds no GPU
        a.work.mkdir(parents=True, exist_ok=True)
        a.json.parent.mkdir(parents=True, exist_ok=True)
        (a.work / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in math_rows(40)))
        env = check_env(None) if a.dry_run else run_child(a, "env", guard=120)
        if env.get("status", "ok") != "ok":
            sys.exit(f"error: {env['error']}")
        if not a.dry_run and not env["figures"]["gpu"]:  # no GPU: the CPU rehearsal
            a.mode = "cpu"
            if not a.tokenizer_arg:
                sys.exit("error: no CUDA GPU here, and the CPU rehearsal needs --tokenizer DIR "
                         "(Qwen3's tokenizer.json); or give --dry-run, or --table")
        a.budget = a.budget or (3600 if a.mode == "cpu" else 480)
        report, e = parent(a, env, t0), env["figures"]
        where = dict(dry="CPU dry-run (tiny shapes, fp32: not GPU figures)", cpu="the CPU "
                     "rehearsal (0.6B shape, a CPU: not GPU figures)").get(a.mode, e["gpu"])
        print(f"realsize on {where}: torch {e['torch']}, CUDA {e['cuda']}, cuDNN {e['cudnn']}, "
              f"transformers {e['transformers']}; {report['date']}, {report['wall_s']:.0f} s of "
              f"--budget {a.budget:g}\n\n| part | check | result | s | command |\n"
              "|---|---|---|---|---|")
        for c, r in [(c, r) for c in report["checks"] for r in c["rows"]]:  # a row per figure
            print("| " + " | ".join(x.replace("|", "\\|") for x in [
                c["part"], r.get("what", c["id"]), r["result"], f"{c['seconds']:.0f}",
                f"`{c['command']}`"]) + " |")
        if a.mode == "cpu":
            print_fit([c["figures"] for c in report["checks"]
                       if c["status"] == "ok" and c["id"].startswith("memory")])
            print("\n== the stored fit (peak_memory_bytes) ==")
            memory_table()
    print(f"\n(the same as JSON: {a.json})", file=sys.stderr)


if __name__ == "__main__":
    main()
