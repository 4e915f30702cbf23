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

    python bench/rehearse.py --tokenizer /path/to/qwen3-tokenizer            # all of it (~15 min, 2 cores)
    python bench/rehearse.py --tokenizer DIR --skip-pipeline --lengths 128 256 # memory only
    python bench/rehearse.py --tokenizer DIR --skip-memory                    # the pipeline only

The tokenizer folder holds Qwen3's tokenizer.json and tokenizer_config.json; nothing downloads.
Memory is measured on this CPU in fp32; the GPU numbers are extrapolations, not measurements.
"""
from __future__ import annotations

import argparse, dataclasses, json, os, random, resource, subprocess, sys, tempfile, time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep: the CPU is shared
ROOT = Path(__file__).resolve().parents[1]  # the repository: train.py, generate.py, tah.py
sys.path.insert(0, str(ROOT))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402

import tah  # noqa: E402

GIB = 2**30
# The two published shapes (config.json of Qwen/Qwen3-0.6B-Base and Qwen/Qwen3-1.7B-Base).
SHAPES = {"0.6b": tah.Qwen3Config(),
          "1.7b": tah.Qwen3Config(hidden_size=2048, intermediate_size=6144)}
STAGE1 = tah.TaHConfig(lora_r=16, lora_alpha=32, lora_dropout=0.1, input_topk=100)  # train.py's 0.6b stage 1
HARD = 0.15  # share of the tokens the oracle sends to pass 2 in the memory runs
CHUNK = 1024  # positions per cross-entropy chunk, as train.py's chunked_ce


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
    """Runs cmd from the repository root, its output shown as it comes and kept in log; returns the
    seconds it took and its exit status."""
    print(f"\n$ {' '.join(cmd)}", flush=True)
    t = time.time()
    with open(log, "w") as f, subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                               text=True) as p:
        for line in p.stdout:
            f.write(line)
            print(f"  | {line}", end="", flush=True)
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


def chunked_ce(logits: torch.Tensor, tgt: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """train.py's chunked_ce: summed CE, each chunk of positions upcast to fp32 and recomputed in backward."""
    def ce(lg, y):
        return F.cross_entropy(lg.float().flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum")
    return sum(checkpoint(ce, logits[:, i:i + chunk], tgt[:, i:i + chunk], use_reentrant=False)
               for i in range(0, logits.shape[1], chunk))


def measure(model_dir: str, length: int, threads: int, chunk: int, bf16: bool) -> dict:
    """In this (fresh) process: resident bytes at each point of one stage-1 step of `length` tokens,
    on the checkpoint model_dir loaded as train.py's stage 1 does (fp32 master weights, a fresh LoRA),
    the CE in chunks of `chunk` positions, under bf16 autocast if bf16."""
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
    r["fixed"] = status_bytes("VmRSS")  # weights + gradients + AdamW moments, no activations
    opt.zero_grad(set_to_none=True)  # as train.py between steps: gradients are freed
    r["between_steps"] = status_bytes("VmRSS")

    g = torch.Generator().manual_seed(length)
    ids = torch.randint(0, config.vocab_size, (1, length), generator=g)
    tgt = F.pad(ids[:, 1:], (0, 1), value=-100)  # every position predicts the next token
    passes = 1 + (torch.rand(1, length, generator=g) < HARD).long()
    passes[:, -1] = 1  # the last position has no next token: never hard (as the oracle)
    reset_peak()
    t = time.time()
    with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        out = model(ids, passes)
        r["after_forward"] = status_bytes("VmRSS")
        loss = chunked_ce(out.logits, tgt, chunk) / length
    del out
    loss.backward()
    r["after_backward"], r["peak_backward"] = status_bytes("VmRSS"), status_bytes("VmHWM")
    torch.nn.utils.clip_grad_norm_(params, 0.2)
    opt.step()
    opt.zero_grad(set_to_none=True)
    r["seconds"] = time.time() - t
    r["peak"] = status_bytes("VmHWM")
    r.update(length=length, chunk=chunk, bf16=bf16, hard=int((passes > 1).sum()))
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
# Model: peak(T) = fixed + T * per_token + min(T, chunk) * ce, for a micro-batch of T tokens, where
#   fixed     = 16 P (fp32 weights, gradients, two AdamW moments) + m * 4VH (dense (V, H) fp32 gradient
#               buffers of the tied embedding alive in backward) + w * 2P (bf16 weight copies autocast keeps)
#   per_token = L * (4 (1 + f) H + kv_bytes * KV) + b * V: each checkpointed layer keeps its fp32 input
#               (the residual stream stays fp32 under autocast) for every pass a token gets (f = share of
#               tokens with pass 2), and pass 1's keys and values (KV = kv heads x head_dim; fp32 k and v:
#               8 bytes, under autocast fp32 k and bf16 v: 6), which pass 2 attends to; b * V is the
#               (T, V) logits and their gradients
#   ce        = c * V: the fp32 internals of one cross-entropy chunk (log-softmax, gradients), bounded by
#               the chunk of 1024 positions.
# L, H, KV and V are theory (what autograd saves); m, b, c (and w) are fitted to the measurements.


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
    n, mx, my = len(xs), sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


def calibrate(runs: list[dict], chunked: dict | None, bf16: bool) -> dict:
    """Fits the model above to one dtype's runs (lengths <= 1024 with 1024-position CE chunks, and one run
    with small chunks that separates the chunk's internals from the per-token part)."""
    c, f = SHAPES["0.6b"], sum(r["hard"] for r in runs) / sum(r["length"] for r in runs)
    V, H, P = c.vocab_size, c.hidden_size, runs[0]["params"]
    fixed, slope = line_fit([r["length"] for r in runs], [r["peak_backward"] for r in runs])
    # the same length with small chunks: what it saves is the chunk's memory for the positions it left out
    ce = (fixed + slope * chunked["length"] - chunked["peak_backward"]) / (chunked["length"] - chunked["chunk"]) \
        if chunked else 0.0
    kv_bytes = 6 if bf16 else 8
    b = (slope - ce - layer_bytes(c, f, kv_bytes)) / V
    runtime = runs[0]["start"]  # Python and torch before the model: on a GPU, outside max_memory_allocated
    extra = fixed - runtime - 16 * P
    return dict(fixed=fixed, slope=slope, ce=ce / V, b=b, f=f, kv_bytes=kv_bytes, runtime=runtime,
                m=extra / (V * H), opt=max(r["peak"] - r["peak_backward"] for r in runs))


def predict(k: dict, c: tah.Qwen3Config, T: int, lora_r: int, f: float | None = None, chunk: int = CHUNK) -> float:
    """The calibrated estimate of the backward peak for config c at T tokens, without the runtime."""
    f, V = k["f"] if f is None else f, c.vocab_size
    return (16 * n_params(c, lora_r) + k["m"] * V * c.hidden_size
            + T * (layer_bytes(c, f, k["kv_bytes"]) + k["b"] * V) + min(T, chunk) * k["ce"] * V)


def attention_scores(c: tah.Qwen3Config, T: int) -> float:
    """Bytes of (heads, T, S) fp32 score-sized buffers SDPA's math kernel holds in one layer's backward
    (scores, saved probabilities, their gradient): what a GPU pays if SDPA cannot take a mask with GQA."""
    return 3 * 4 * c.num_attention_heads * T * T  # pass 1's layers: T queries, T keys (pass 2's are fewer)


def memory(model_dir: Path, lengths: list[int], bf16_lengths: list[int], chunk_run: list[int], threads: int) -> None:
    """The measurements, one fresh process each and one at a time, then the fit and the extrapolation."""
    print(f"\n== 3. peak resident memory of one stage-1 step (measured on this CPU, one process each) ==")
    print("lengths are tokens of one row (micro-batch 1); LoRA r16, grad checkpointing, ~15% of tokens iterate;\n"
          "peak_bwd = VmHWM through forward and backward, peak = also through clip + AdamW step")
    print(f"{'dtype':13} {'tokens':>6} {'chunk':>5} {'hard':>4} {'weights':>8} {'fixed':>8} {'between':>8} "
          f"{'fwd_end':>8} {'peak_bwd':>8} {'peak':>8} {'step s':>6}   (GiB; fixed = weights+grads+AdamW)")
    runs = {False: [], True: []}
    chunked = {}
    # per dtype: the lengths with 1024-position CE chunks, then one length again with small chunks, whose
    # difference from the fitted line is the memory of a chunk's positions
    plan = [(T, CHUNK, bf16) for bf16, Ts in ((False, lengths), (True, bf16_lengths)) for T in Ts] + \
        [(*chunk_run, bf16) for bf16, Ts in ((False, lengths), (True, bf16_lengths)) if len(Ts) > 1]
    plan.sort(key=lambda x: x[2])  # fp32 first
    for T, chunk, bf16 in plan:
        r = child_measure(model_dir, T, threads, chunk, bf16)
        (runs[bf16] if chunk == CHUNK else chunked.__setitem__(bf16, r) or []).append(r)
        print(f"{'bf16 autocast' if bf16 else 'fp32':13} {T:6} {chunk:5} {r['hard']:4} {r['weights'] / GIB:8.2f} "
              f"{r['fixed'] / GIB:8.2f} {r['between_steps'] / GIB:8.2f} {r['after_forward'] / GIB:8.2f} "
              f"{r['peak_backward'] / GIB:8.2f} {r['peak'] / GIB:8.2f} {r['seconds']:6.0f}", flush=True)
    c = SHAPES["0.6b"]
    cal = {}
    print("\n== 4. the estimator: peak = 16 P + m V H + T (L (4 (1 + f) H + kvb KV) + b V) + min(T, 1024) c V ==")
    for bf16 in (False, True):
        if len(runs[bf16]) < 2:
            continue
        k = cal[bf16] = calibrate(runs[bf16], chunked.get(bf16), bf16)
        name = "bf16 autocast" if bf16 else "fp32"
        print(f"{name}: fitted line peak_bwd = {k['fixed'] / GIB:.2f} GiB + T x {k['slope'] / 2**20:.3f} MiB; "
              f"f = {k['f']:.3f}, kvb = {k['kv_bytes']}, m = {k['m']:.2f}, b = {k['b']:.2f}, c = {k['ce']:.2f} "
              f"bytes; runtime (not a model's) {k['runtime'] / GIB:.2f} GiB; optimizer step adds "
              f"{k['opt'] / GIB:.2f} GiB over peak_bwd at most")
        print(f"  {'tokens':>6} {'chunk':>5} {'measured':>9} {'predicted':>9} {'error':>6}")
        for r in runs[bf16] + ([chunked[bf16]] if bf16 in chunked else []):
            p = predict(k, c, r["length"], STAGE1.lora_r, r["hard"] / r["length"], r["chunk"]) + k["runtime"]
            print(f"  {r['length']:6} {r['chunk']:5} {r['peak_backward'] / GIB:8.2f}G {p / GIB:8.2f}G "
                  f"{100 * (p / r['peak_backward'] - 1):+5.1f}%")
    if True not in cal:
        return
    k = cal[True]
    print("\n== EXTRAPOLATED (not measured): one GPU, bf16 autocast, micro-batch 1, f = 0.15 of tokens iterating ==")
    print("backward peak from the bf16 constants above without the runtime; the AdamW step (foreach on CUDA)\n"
          "peaks at 20 P (weights, grads, moments + one param-sized temporary); attention: + the math-kernel\n"
          "score buffers if SDPA falls back to it (a boolean mask with enable_gqa=True on CUDA)")
    print(f"{'model':6} {'tokens':>6} {'params':>7} {'16P':>6} {'acts':>6} {'bwd_peak':>8} {'adamw':>6} "
          f"{'O(T) attn':>9} {'math attn':>9}  (GiB)")
    for name, lora_r in (("0.6b", 16), ("1.7b", 32)):
        cfg = SHAPES[name]
        P = n_params(cfg, lora_r)
        for T in (4096, 8192):
            bwd = predict(k, cfg, T, lora_r, 0.15)
            peak = max(bwd, 20 * P)
            print(f"{name:6} {T:6} {P / 1e9:6.2f}B {16 * P / GIB:6.1f} {(bwd - 16 * P) / GIB:6.1f} {bwd / GIB:8.1f} "
                  f"{20 * P / GIB:6.1f} {peak / GIB:9.1f} {(bwd + attention_scores(cfg, T)) / GIB:9.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", required=True, help="folder with Qwen3's tokenizer.json and tokenizer_config.json")
    p.add_argument("--work", help="folder for the model, rows and runs (default: a temporary one, removed)")
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512], help="tokens of the fp32 memory runs")
    p.add_argument("--bf16-lengths", type=int, nargs="*", default=[128, 512],
                   help="tokens of the memory runs under bf16 autocast (none: skip them)")
    p.add_argument("--chunk-run", type=int, nargs=2, default=[256, 64], metavar=("TOKENS", "CHUNK"),
                   help="the run that separates the CE chunk's memory: its length and smaller chunk")
    p.add_argument("--threads", type=int, default=0, help="CPU threads of every process (0: PyTorch's default)")
    p.add_argument("--skip-pipeline", action="store_true", help="only the memory runs")
    p.add_argument("--skip-memory", action="store_true", help="only the pipeline")
    p.add_argument("--child", nargs=4, metavar=("MODEL", "LENGTH", "CHUNK", "BF16"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(measure(a.child[0], int(a.child[1]), a.threads, int(a.child[2]), bool(int(a.child[3])))))
        return
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
            memory(model, a.lengths, a.bf16_lengths or [], a.chunk_run, a.threads)
            times["memory runs"] = (time.time() - t, 0)
    print("\n== timings (a 2-core machine shared with other jobs: pessimistic) ==")
    for name, (dt, rc) in times.items():
        print(f"  {name:12} {dt:6.0f} s" + (f"  exit {rc}" if rc else ""))
    print(f"  {'total':12} {time.time() - t0:6.0f} s")


if __name__ == "__main__":
    main()
