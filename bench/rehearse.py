"""A rehearsal of `python train.py --size 0.6b` at the true Qwen3-0.6B shape, on a CPU, with no downloads.

1. Builds a random Qwen3 with the exact Qwen3-0.6B config (tah.Qwen3Config's defaults: 28 layers,
   hidden 1024, intermediate 3072, 16/8 heads, head_dim 128, vocab 151936, tied embeddings) and saves
   it with the real Qwen3 tokenizer files (folder given by --tokenizer), beside ~40 math rows
   ({"question", "generation"} with a <think> block and a \\boxed{} answer).
2. Runs the whole 0.6b pipeline on it, as a user would: train.py (data, oracle labels, stage 1,
   stage 2, evaluation) at a short --max-len, then generate.py on the result; times each stage.
3. Measures the peak resident memory (VmHWM) of one stage-1 training step at a few lengths, each in
   a fresh process: fp32, LoRA, gradient checkpointing, ~15% of the tokens iterating, the CE in
   chunks of 1024 positions, backward, one AdamW step; and the resident memory before the step
   (weights, gradients and AdamW moments, no activations).
4. Fits peak = fixed + tokens x per_token, prints measured against predicted, and extrapolates
   (clearly labelled) to bf16 autocast on a GPU at 4096 and 8192 tokens for Qwen3-0.6B and -1.7B.
5. Prints the README's memory table from the fit stored below (peak_memory_bytes), which these
   runs made; `--table` prints it alone, in seconds.

    python bench/rehearse.py --tokenizer /path/to/qwen3-tokenizer        # all of it (2 idle cores: ~15 min)
    python bench/rehearse.py --tokenizer DIR --skip-pipeline              # the memory runs only
    python bench/rehearse.py --tokenizer DIR --skip-memory                # the pipeline only
    python bench/rehearse.py --tokenizer DIR --lengths 128 256 --bf16-lengths   # fewer runs, fp32 only
    python bench/rehearse.py --table                                      # the stored fit's table

The tokenizer folder holds Qwen3's tokenizer.json and tokenizer_config.json; nothing downloads.
Memory is measured on this CPU, in fp32 and under CPU bf16 autocast; the GPU numbers are
extrapolations from those constants, not measurements. One stage-1 step at 0.6B needs ~12 GB.
"""
from __future__ import annotations

import argparse, json, os, random, subprocess, sys, tempfile, time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep: the CPU is shared
ROOT = Path(__file__).resolve().parents[1]  # the repository: train.py, generate.py, tah.py
sys.path.insert(0, str(ROOT))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402

import tah  # noqa: E402
import train  # noqa: E402
from train import CE_CHUNK as CHUNK  # noqa: E402  (positions whose logits a step makes at a time)

GIB = 2**30
# The two published shapes (config.json of Qwen/Qwen3-0.6B-Base and Qwen/Qwen3-1.7B-Base).
SHAPES = {"0.6b": tah.Qwen3Config(),
          "1.7b": tah.Qwen3Config(hidden_size=2048, intermediate_size=6144)}
STAGE1 = tah.TaHConfig(lora_r=16, lora_alpha=32, lora_dropout=0.1, input_topk=100)  # train.py's 0.6b stage 1
HARD = 0.15  # share of the tokens the oracle sends to pass 2 in the memory runs, as in the paper


# ----------------------------------------------------------------------------- the rehearsal's inputs


def math_rows(n: int, seed: int = 0) -> list[dict]:
    """n arithmetic word problems, each a worked <think> trace of 1 to 16 steps and a \\boxed{} answer:
    with Qwen3's chat format about 70 to 230 tokens, so that --max-len 128 keeps some and not others."""
    rng, rows = random.Random(seed), []
    for i in range(n):
        a, b, days = rng.randint(2, 99), rng.randint(2, 99), 2 + (i * 7) % 16
        total = a + (days - 1) * b
        steps = "\n".join(f"{a + (d - 1) * b}+{b}={a + d * b}" for d in range(1, days))
        rows.append({"question": f"A shop sells {a} pens on day 1 and {b} more each day. How many after {days} days?",
                     "generation": f"<think>\nAdd {b} per day.\n{steps}\n</think>\n\n{a}+{days - 1}*{b}={total}, "
                                   f"so the answer is \\boxed{{{total}}}."})
    return rows


def write_inputs(work: Path, tokenizer: Path) -> tuple[Path, Path]:
    """A random Qwen3-0.6B (bf16 on disk, as the hub's) with the tokenizer, and rows.jsonl."""
    if not (tokenizer / "tokenizer.json").exists():
        sys.exit(f"--tokenizer {tokenizer}: no tokenizer.json there; pass the folder holding Qwen3's "
                 "tokenizer.json and tokenizer_config.json")
    config = tah.Qwen3Config(eos_token_id=151645)  # <|im_end|>, as Qwen3's generation_config
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size, config.num_attention_heads,
            config.num_key_value_heads, config.head_dim, config.vocab_size, config.tie_word_embeddings,
            config.rope_theta) == (28, 1024, 3072, 16, 8, 128, 151936, True, 1e6), "not Qwen3-0.6B's config"
    torch.manual_seed(0)
    model = tah.TaH(config).to(torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    tah.save(model, work / "qwen3-0.6b-random", tokenizer_dir=tokenizer)
    del model
    print(f"random Qwen3-0.6B: {n / 1e6:.1f}M parameters, saved to {work / 'qwen3-0.6b-random'}", flush=True)
    rows = work / "rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in math_rows(40)))
    return work / "qwen3-0.6b-random", rows


# ----------------------------------------------------------------------------- 2. the pipeline


def run_stage(name: str, cmd: list[str], log: Path) -> tuple[float, int]:
    """Runs cmd from the repository root, its output shown as it comes (with the seconds since the
    start, which time the stages inside) and kept in log; returns the seconds and the exit status."""
    print(f"\n$ {' '.join(cmd)}", flush=True)
    t = time.time()
    with open(log, "w") as f, subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                               text=True) as p:
        for line in p.stdout:
            f.write(line)
            print(f"  |{time.time() - t:5.0f}s | {line}", end="", flush=True)
    dt = time.time() - t
    print(f"[{name}: {dt:.0f} s, exit {p.returncode}]", flush=True)
    return dt, p.returncode


def pipeline(work: Path, model: Path, rows: Path, threads: int) -> dict:
    """train.py --size 0.6b on the random model (also the oracle's reference), then generate.py on its result."""
    out, py = work / "run", sys.executable
    train = [py, "train.py", "--size", "0.6b", "--model", str(model), "--reference", str(model), "--data", str(rows),
             "--out", str(out), "--max-len", "128", "--steps", "2", "--decider-steps", "2", "--batch", "2",
             "--micro-batch", "1", "--eval-samples", "2", "--device", "cpu", "--dtype", "float32",
             "--threads", str(threads)]
    gen = [py, "generate.py", "--model", str(out / "tah"), "--max-new-tokens", "8", "--greedy", "What is 2+3?"]
    res = {"train.py": run_stage("train.py", train, work / "train.out")}
    if not (out / "tah" / "config.json").exists():
        print(f"FAILED: train.py left no checkpoint at {out / 'tah'}; generate.py not run")
        return res
    res["generate.py"] = run_stage("generate.py", gen, work / "generate.out")
    return res


# ----------------------------------------------------------------------------- 3. memory of one stage-1 step


def status_bytes(key: str) -> int:
    """VmRSS or VmHWM (peak resident) of this process, from /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def reset_peak() -> None:
    """Makes VmHWM restart from the current resident size (Linux: clear_refs 5)."""
    Path("/proc/self/clear_refs").write_text("5")


PHASES = ["forward", "logits", "layers", "optimizer"]  # the parts of a step whose peaks measure() keeps apart


def measure(model_dir: str, length: int, threads: int, chunk: int, bf16: bool) -> dict:
    """In this (fresh) process: the peak resident bytes of each phase of one stage-1 step of `length`
    tokens, on the checkpoint model_dir loaded as train.py's stage 1 does (fp32 master weights, a fresh
    LoRA), the CE in chunks of `chunk` positions, under bf16 autocast if bf16. The phases: forward (with
    the loss), logits (backward until the first layer is recomputed: CE, logits, lm_head), layers (the
    rest of backward), optimizer (clipping and the AdamW step). Gradients exist before the step, as
    for every micro-batch of a step but the first (train.py's 0.6b: 128 micro-batches of one row)."""
    if threads:
        torch.set_num_threads(threads)
    r = {"start": status_bytes("VmRSS")}
    torch.manual_seed(0)
    model = tah.add_parts(tah.load(model_dir, dtype=torch.float32), STAGE1)
    config = model.config
    model.grad_checkpointing = True
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    r["params"] = sum(p.numel() for p in params)
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.01},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}], lr=1e-5)
    r["weights"] = status_bytes("VmRSS")
    for p in params:  # AdamW allocates its two moments in its first step: take one on zero gradients
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=False)  # gradients stay allocated, as between micro-batches
    r["fixed"] = status_bytes("VmRSS")  # weights + gradients + AdamW moments, no activations

    g = torch.Generator().manual_seed(length)
    ids = torch.randint(0, config.vocab_size, (1, length), generator=g)
    tgt = F.pad(ids[:, 1:], (0, 1), value=-100)  # every position predicts the next token
    passes = 1 + (torch.rand(1, length, generator=g) < HARD).long()
    passes[:, -1] = 1  # the last position has no next token: never hard (as the oracle)
    peaks = {}

    def end_of(phase: str) -> None:  # the peak since the last mark, then a fresh start
        peaks[phase] = status_bytes("VmHWM")
        reset_peak()

    # the last layer runs first in backward (recomputed by its checkpoint): the logits phase ends there
    hook = model.model.layers[-1].register_forward_pre_hook(
        lambda *_: end_of("logits") if "forward" in peaks and "logits" not in peaks else None)
    reset_peak()
    t = time.time()
    train.CE_CHUNK = chunk
    batch = dict(ids=ids, valid=torch.ones_like(ids, dtype=torch.bool), tgt=tgt, passes=passes)
    with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        loss = train.lm_loss(model, batch, "oracle")[0] / length
    end_of("forward")
    loss.backward()
    end_of("layers")
    hook.remove()
    torch.nn.utils.clip_grad_norm_(params, 0.2)
    opt.step()
    opt.zero_grad(set_to_none=False)
    end_of("optimizer")
    r["seconds"] = time.time() - t
    r.update(peaks, length=length, chunk=chunk, bf16=bf16, hard=int((passes > 1).sum()))
    r["peak"] = max(peaks[k] for k in PHASES)
    return r


def child_measure(model_dir: Path, length: int, threads: int, chunk: int = CHUNK, bf16: bool = False) -> dict:
    """measure() in a fresh process, so that each peak is its own."""
    cmd = [sys.executable, __file__, "--tokenizer", "-", "--child", str(model_dir), str(length), str(chunk),
           str(int(bf16)), "--threads", str(threads)]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"memory run {model_dir.name} at {length} tokens failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- 4. the estimator
# For each phase of a step (forward, logits, layers) a line in the tokens T of the micro-batch:
#   peak = 16 P + extra + T * (L * (4 (1 + f) H + kvb * KV) + b V) + min(T, chunk) * c V
# 16 P: fp32 weights, gradients and two AdamW moments (P parameters). extra: what does not grow with T,
# in bytes per parameter for the forward (autocast keeps a bf16 copy of every weight it casts until the
# forward's autocast region ends) and in units of V H for the others (the (V, H) tied embedding's
# gradient buffers, the bf16 copy of lm_head that its backward keeps). Per token: each checkpointed
# layer keeps its fp32 input (the residual stream stays fp32 under autocast) for every pass a token
# gets (f = share of tokens with pass 2), and pass 1's keys and values (KV = kv heads x head_dim; fp32
# k and v: kvb = 8; under autocast fp32 k and bf16 v: 6), which pass 2 attends to; b V is the (T, V)
# logits and their gradients; c V the fp32 internals of one cross-entropy chunk (at most 1024
# positions). L, H, KV, V are theory (what autograd keeps); extra, b and c are fitted per phase.
# The step's peak is the largest phase, or the optimizer step's (16 P + a constant) if that is larger.


def n_params(c: tah.Qwen3Config, lora_r: int) -> int:
    """Parameters of a tied Qwen3 with LoRA rank lora_r on its seven projections."""
    q, kv, H, I = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim, c.hidden_size, \
        c.intermediate_size
    layer = H * q + 2 * H * kv + q * H + 3 * H * I + 2 * H + 2 * c.head_dim
    lora = lora_r * ((H + q) + 2 * (H + kv) + (q + H) + 2 * (H + I) + (I + H))
    return c.vocab_size * H + c.num_hidden_layers * (layer + lora) + H


def layer_bytes(c: tah.Qwen3Config, f: float, kv_bytes: float) -> float:
    """Bytes per token the checkpointed layers keep: fp32 inputs of each pass, pass 1's keys and values."""
    return c.num_hidden_layers * (4 * (1 + f) * c.hidden_size + kv_bytes * c.num_key_value_heads * c.head_dim)


def line_fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares intercept and slope."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


def calibrate(runs: list[dict], chunked: dict | None, bf16: bool) -> dict:
    """Fits each phase's line to one dtype's runs (lengths <= 1024 with 1024-position CE chunks, and one
    run with small chunks: what it saves against the line is the chunk's memory for the positions it left out)."""
    c, f = SHAPES["0.6b"], sum(r["hard"] for r in runs) / sum(r["length"] for r in runs)
    V, H, P, runtime = c.vocab_size, c.hidden_size, runs[0]["params"], runs[0]["start"]
    k = dict(f=f, kv_bytes=6 if bf16 else 8, runtime=runtime)
    for ph in ("forward", "logits", "layers"):
        fixed, slope = line_fit([r["length"] for r in runs], [r[ph] for r in runs])
        ce = (fixed + slope * chunked["length"] - chunked[ph]) / (chunked["length"] - chunked["chunk"]) \
            if chunked else 0.0
        extra = fixed - runtime - 16 * P
        k[ph] = dict(fixed=fixed, slope=slope, c=ce / V, b=(slope - ce - layer_bytes(c, f, k["kv_bytes"])) / V,
                     extra=extra / P if ph == "forward" else extra / (V * H))
    k["optimizer"] = max(r["optimizer"] for r in runs) - runtime - 16 * P  # CPU AdamW: one tensor at a time
    return k


def predict(k: dict, c: tah.Qwen3Config, T: int, lora_r: int, f: float | None = None, chunk: int = CHUNK,
            gpu: bool = False) -> dict:
    """The calibrated peak of each phase (bytes, no runtime) for config c at T tokens; on a GPU the
    optimizer phase is 20 P: AdamW's foreach path makes one parameter-sized temporary for all tensors."""
    f, V, P = k["f"] if f is None else f, c.vocab_size, n_params(c, lora_r)
    out = {}
    for ph in ("forward", "logits", "layers"):
        q = k[ph]
        extra = q["extra"] * P if ph == "forward" else q["extra"] * V * c.hidden_size
        out[ph] = 16 * P + extra + T * (layer_bytes(c, f, k["kv_bytes"]) + q["b"] * V) + min(T, chunk) * q["c"] * V
    out["optimizer"] = 20 * P if gpu else 16 * P + k["optimizer"]
    out["peak"] = max(out.values())
    return out


def attention_scores(c: tah.Qwen3Config, T: int) -> float:
    """Bytes of (heads, T, T) fp32 score-sized buffers SDPA's math kernel holds in one layer's backward
    (scores, saved probabilities, their gradient): what a GPU pays if SDPA cannot take a mask with GQA."""
    return 3 * 4 * c.num_attention_heads * T * T  # pass 1's layers: T queries, T keys (pass 2's are fewer)


def memory(model_dir: Path, lengths: list[int], bf16_lengths: list[int], chunk_run: list[int], check: int,
           threads: int) -> None:
    """The measurements, one fresh process each and one at a time, then the fit and the extrapolation."""
    print("\n== 3. peak resident memory of one stage-1 step (MEASURED on this CPU, one process each) ==")
    print("one row of T tokens (micro-batch 1), LoRA r16, grad checkpointing, ~15% of tokens iterate, gradients\n"
          "already allocated (every micro-batch but a step's first); fixed = weights + grads + AdamW moments;\n"
          "then the peak of each phase: forward (+loss), logits (backward to the first layer), layers (the rest\n"
          "of backward), optimizer (clip + AdamW); GiB, resident memory including ~0.2 GiB of Python and torch")
    print(f"{'dtype':13} {'tokens':>6} {'chunk':>5} {'hard':>4} {'fixed':>6} "
          + " ".join(f"{ph:>9}" for ph in PHASES) + f" {'step s':>6}")
    runs, chunked = {False: [], True: []}, {}
    # per dtype: the lengths with 1024-position CE chunks, then one length again with small chunks
    plan = [(T, CHUNK, bf16) for bf16, Ts in ((False, lengths), (True, bf16_lengths)) for T in Ts] + \
        [(*chunk_run, bf16) for bf16, Ts in ((False, lengths), (True, bf16_lengths)) if len(Ts) > 1]
    plan.sort(key=lambda x: x[2])  # fp32 first
    plan += [(check, CHUNK, False)] * bool(check)  # held out of the fit: predicted, then compared
    for T, chunk, bf16 in plan:
        r = child_measure(model_dir, T, threads, chunk, bf16)
        if (T, bf16) == (check, False) and len(runs[False]) == len(lengths):
            held = r
        elif chunk == CHUNK:
            runs[bf16].append(r)
        else:
            chunked[bf16] = r
        print(f"{'bf16 autocast' if bf16 else 'fp32':13} {T:6} {chunk:5} {r['hard']:4} {r['fixed'] / GIB:6.2f} "
              + " ".join(f"{r[ph] / GIB:9.2f}" for ph in PHASES) + f" {r['seconds']:6.0f}", flush=True)
    c, cal = SHAPES["0.6b"], {}
    print("\n== 4. the estimator, per phase: 16 P + extra + T (L (4 (1 + f) H + kvb KV) + b V) + min(T, 1024) c V ==")
    for bf16 in (False, True):
        if len(runs[bf16]) < 2:
            continue
        k = cal[bf16] = calibrate(runs[bf16], chunked.get(bf16), bf16)
        print(f"{'bf16 autocast' if bf16 else 'fp32'}: f = {k['f']:.3f}, kvb = {k['kv_bytes']}, runtime "
              f"{k['runtime'] / GIB:.2f} GiB (not the model's); optimizer phase 16 P + {k['optimizer'] / GIB:.2f} GiB")
        for ph in ("forward", "logits", "layers"):
            q = k[ph]
            unit = "bytes/param" if ph == "forward" else "x V H"
            print(f"  {ph:8} line {q['fixed'] / GIB:6.2f} GiB + T x {q['slope'] / 2**20:.3f} MiB: extra {q['extra']:.2f} "
                  f"{unit}, b = {q['b']:.2f}, c = {q['c']:.2f} bytes")
        print(f"  {'tokens':>6} {'chunk':>5} {'measured':>9} {'predicted':>9} {'error':>6}  (step peak: the largest phase)")
        for r in runs[bf16] + ([chunked[bf16]] if bf16 in chunked else []):
            p = predict(k, c, r["length"], STAGE1.lora_r, r["hard"] / r["length"], r["chunk"])["peak"] + k["runtime"]
            print(f"  {r['length']:6} {r['chunk']:5} {r['peak'] / GIB:8.2f}G {p / GIB:8.2f}G "
                  f"{100 * (p / r['peak'] - 1):+5.1f}%  (fitted)")
        if check and not bf16:
            p = predict(k, c, check, STAGE1.lora_r, held["hard"] / check)
            print(f"  {check:6} {CHUNK:5} {held['peak'] / GIB:8.2f}G {(p['peak'] + k['runtime']) / GIB:8.2f}G "
                  f"{100 * ((p['peak'] + k['runtime']) / held['peak'] - 1):+5.1f}%  (HELD OUT of the fit; "
                  + ", ".join(f"{ph} {held[ph] / GIB:.2f}G vs {(p[ph] + k['runtime']) / GIB:.2f}G"
                              for ph in ("forward", "logits", "layers")) + ")")
    if True not in cal:
        return
    k = cal[True]
    print("\n== EXTRAPOLATED, NOT MEASURED: one GPU, bf16 autocast, micro-batch 1, f = 0.15 of the tokens iterate ==")
    print("each phase from the CPU bf16-autocast constants above (no runtime; CUDA context and allocator slack\n"
          "come on top); optimizer = 20 P (CUDA AdamW's foreach path: one temporary the size of all parameters);\n"
          "'+math attn' adds the (heads, T, T) fp32 buffers of SDPA's math kernel, which CUDA falls back to\n"
          "when a boolean mask comes with enable_gqa=True (the CPU's flash kernel takes both: not measured here)")
    print(f"{'model':5} {'tokens':>6} {'params':>7} {'16P':>5} " + " ".join(f"{ph:>9}" for ph in PHASES)
          + f" {'peak':>6} {'+math attn':>10}  (GiB)")
    for name, lora_r in (("0.6b", 16), ("1.7b", 32)):
        cfg = SHAPES[name]
        P = n_params(cfg, lora_r)
        for T in (4096, 8192):
            e = predict(k, cfg, T, lora_r, 0.15, gpu=True)
            math_attn = max(e["peak"], e["layers"] + attention_scores(cfg, T))
            print(f"{name:5} {T:6} {P / 1e9:6.2f}B {16 * P / GIB:5.1f} " + " ".join(f"{e[ph] / GIB:9.1f}" for ph in PHASES)
                  + f" {e['peak'] / GIB:6.1f} {math_attn / GIB:10.1f}")


# ----------------------------------------------------------------------------- 5. the stored fit
# The estimator's constants as calibrate() found them on the project's 2-core CPU (peak resident memory
# of one step at 128-768 tokens, fp32 and bf16 autocast): the README's memory table comes from them.
# Every phase holds 16 bytes per parameter (fp32 weight, gradient, two AdamW moments) and, per token,
# each checkpointed layer's input for every pass it gets plus pass 1's keys and values. On top, per
# phase: (bytes per parameter, such as autocast's weight copies; (V, H)-sized gradient buffers of the
# tied embedding; bytes x V per token for the logits and their gradients; bytes x V per position of
# one cross-entropy chunk). Phases: forward, backward through the head, backward through the layers.
# AdamW's update needs 20 bytes per parameter for a moment.
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
    print("stage 1 on one GPU, bf16 autocast, micro-batch 1, 15% of the tokens iterating: estimated "
          "peak memory (GiB)\nmodel  16 bytes x params  4096 tokens  8192 tokens  (EXTRAPOLATED "
          "from CPU runs: CUDA context and allocator slack come on top)")
    for name, lora in (("0.6b", 16), ("1.7b", 32)):
        config, parts = SHAPES[name], tah.TaHConfig(lora_r=lora, lora_alpha=2 * lora)
        with torch.device("meta"):
            params = sum(p.numel() for p in tah.TaH(config, parts).parameters())
        print(f"{name:6} {16 * params / GIB:8.1f} ({params / 1e9:.2f}B)" + "".join(
            f"{peak_memory_bytes(config, parts, T, 1, torch.bfloat16) / GIB:13.1f}"
            for T in (4096, 8192)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", help="folder with Qwen3's tokenizer.json and tokenizer_config.json")
    p.add_argument("--table", action="store_true", help="only print the memory table from the stored fit")
    p.add_argument("--work", help="folder for the model, rows and runs (default: a temporary one, removed)")
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512], help="tokens of the fp32 memory runs")
    p.add_argument("--bf16-lengths", type=int, nargs="*", default=[128, 512],
                   help="tokens of the memory runs under bf16 autocast (none: skip them)")
    p.add_argument("--chunk-run", type=int, nargs=2, default=[256, 64], metavar=("TOKENS", "CHUNK"),
                   help="the run that separates the CE chunk's memory: its length and smaller chunk")
    p.add_argument("--check-length", type=int, default=768,
                   help="an fp32 run left out of the fit, to compare with the estimate (0: none)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads of every process (0: PyTorch's default)")
    p.add_argument("--skip-pipeline", action="store_true", help="only the memory runs")
    p.add_argument("--skip-memory", action="store_true", help="only the pipeline")
    p.add_argument("--child", nargs=4, metavar=("MODEL", "LENGTH", "CHUNK", "BF16"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(measure(a.child[0], int(a.child[1]), a.threads, int(a.child[2]), bool(int(a.child[3])))))
        return
    if a.table:
        return memory_table()
    if not a.tokenizer:
        p.error("--tokenizer DIR is needed (or --table for the stored fit's memory table alone)")
    print(f"bench/rehearse.py at {time.strftime('%Y-%m-%d %H:%M:%S')}, {os.cpu_count()} CPUs, "
          f"{a.threads} thread(s) per process, torch {torch.__version__}", flush=True)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.work) if a.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        model, rows = write_inputs(work, Path(a.tokenizer))
        times = {"inputs": (time.time() - t0, 0)}
        if not a.skip_pipeline:
            print("\n== 2. the --size 0.6b pipeline on the random model, the real tokenizer and rows.jsonl ==")
            times.update(pipeline(work, model, rows, a.threads))
        if not a.skip_memory:
            t = time.time()
            memory(model, a.lengths, a.bf16_lengths or [], a.chunk_run, a.check_length, a.threads)
            times["memory runs"] = (time.time() - t, 0)
    print("\n== 5. the stored fit (peak_memory_bytes) ==")
    memory_table()
    print("\n== timings (a 2-core machine shared with other jobs: pessimistic) ==")
    for name, (dt, rc) in times.items():
        print(f"  {name:12} {dt:6.0f} s" + (f"  exit {rc}" if rc else ""))
    print(f"  {'total':12} {time.time() - t0:6.0f} s")


if __name__ == "__main__":
    main()
