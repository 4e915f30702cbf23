"""Train Think-at-Hard end to end: data, oracle labels, (pruning), stage 1, stage 2, evaluation.

    python train.py                                 # toy: a 68k-parameter Qwen3 on a look-up task, CPU, minutes
    python train.py --size 0.6b                     # Qwen3-0.6B-Base on an OpenR1-Math subset: 24 GB GPU, hours
    python train.py --size 0.6b --samples 0 --epochs 5 --max-len 8192  # the published recipe (days, > 24 GB)
    python train.py --size 0.6b --baseline          # the paper's Standard: same data and budget, no iteration
    python train.py --size 0.6b --prune             # "TaH": drop the least useful layer first (default "TaH+")
    python train.py --size 0.6b --data my.jsonl     # lines {"question", "generation"} or {"messages": [...]}
    torchrun --nproc_per_node 8 train.py --size 1.7b          # 8 GPUs, data-parallel: the same steps, ~8x faster
    torchrun --nproc_per_node 8 train.py --size 1.7b --shard  # weights, gradients, AdamW state split over them
    python generate.py --model runs/toy/tah --greedy --max-new-tokens 1 "A>C B>J C>A D>E E>D F>G G>F H>I I>H J>B | 2: A"

Each stage writes under --out (default runs/<size>): data.safetensors, labels.safetensors, prune.json,
checkpoints (tah/ is the final model; stage1/, standard/, ...), eval.json and train.log. Rerunning
the command skips finished stages and resumes an interrupted one from <stage>.state.pt, bitwise on
a CPU. Ctrl-C saves and exits. The toy task: a table maps 10 letters to each other; a query asks for
table[x] (1-hop) or table[table[x]] (2-hop: two look-ups, more than one pass of one layer can do).
Under torchrun each process takes its share of every step's rows and the gradients are summed over
the processes: the step one process would take. Rank 0 alone makes the data and labels, logs and
writes; states hold whole tensors keyed by name, so a run resumes on any number of processes.
"""
from __future__ import annotations

import argparse, functools, hashlib, itertools, json, math, os, signal, sys, time
from datetime import timedelta
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: on a shared CPU, spinning made the toy's tiny ops ~15x
# slower with 2 threads. It has to be set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import load_file, save as safetensors_bytes  # noqa: E402
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,  # noqa: E402
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule, fully_shard  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402

import tah  # noqa: E402

# The published settings (the toy's are tuned for a CPU); each has a flag. The threshold is the evaluation one
# (0.9); the authors' training threshold (0.8) only matters if pass 2 runs in stage 2, which it does not here.
SIZES = {
    "toy": dict(model=None, reference=None, lr=3e-3, decider_lr=1e-3, warmup=0.03, weight_decay=0.01, clip=1.0,
                batch=64, micro_batch=64, samples=0, epochs=1, decider_epochs=1, pretrain_steps=600, steps=600,
                decider_steps=300, max_len=64, lora=(8, 16, 0.0), input_topk=8, decider_layers=[0, 1],
                decider_dims=[64] * 2, decider_topk=8, pos_weight=0.0, threshold=0.5, eval_samples=1000),
    "0.6b": dict(model="Qwen/Qwen3-0.6B-Base", reference="Qwen/Qwen3-0.6B", lr=4e-5, decider_lr=3e-5, warmup=0.03,
                 weight_decay=0.01, clip=0.2, batch=128, micro_batch=1, samples=12800, epochs=1, decider_epochs=2,
                 pretrain_steps=0, steps=0, decider_steps=0, max_len=4096, lora=(16, 32, 0.1), input_topk=100,
                 decider_layers=[0, 7, 13, 20, 26], decider_dims=[256] * 6, decider_topk=100, pos_weight=4.8,
                 threshold=0.9, eval_samples=200),
}
SIZES["1.7b"] = SIZES["0.6b"] | dict(model="Qwen/Qwen3-1.7B-Base", reference="Qwen/Qwen3-1.7B", max_len=8192,
                                     lora=(32, 64, 0.1), decider_layers=[2, 10, 18, 26], decider_dims=[512] * 6,
                                     pos_weight=5.4)
POLICIES = ["standard", "always", "oracle", "decider"]

# ----------------------------------------------------------------------------- data
# A data set is flat: ids (all tokens), target (1 = a scored response token; the toy marks 2-hop answers 2),
# offsets (row i is ids[offsets[i]:offsets[i+1]]), start (first position that may iterate), train/held rows.

N_LETTERS, N_QUERIES = 10, 16
TOY_VOCAB = ["<unk>", "|", "1:", "2:"] + [chr(65 + i) for i in range(N_LETTERS)] + \
            [f"{chr(65 + k)}>{chr(65 + v)}" for k in range(N_LETTERS) for v in range(N_LETTERS)]
SEP, HOP1, LETTER, PAIR = 1, 2, 4, 4 + N_LETTERS  # token ids: separator, 1-hop marker (2-hop = 3), letters, pairs


def toy_data(n: int, n_held: int, seed: int) -> dict:
    """n rows `pairs | (marker x answer) * 16`: a random table, one token per pair "k>v", then queries."""
    g = torch.Generator().manual_seed(seed)
    table = torch.rand(n, N_LETTERS, generator=g).argsort(1)  # (n, 10): letter k -> table[k]
    order = torch.rand(n, N_LETTERS, generator=g).argsort(1)  # the order in which the pairs are listed
    pairs = PAIR + order * N_LETTERS + table.gather(1, order)  # (n, 10)
    x = torch.randint(0, N_LETTERS, (n, N_QUERIES), generator=g)
    two = torch.rand(n, N_QUERIES, generator=g).argsort(1) < N_QUERIES // 2  # half the queries are 2-hop
    once = table.gather(1, x)
    answer = torch.where(two, table.gather(1, once), once)
    queries = torch.stack([HOP1 + two.long(), LETTER + x, LETTER + answer], -1).flatten(1)  # (n, 48)
    ids = torch.cat([pairs, torch.full((n, 1), SEP), queries], 1)  # (n, 59)
    target = torch.zeros_like(ids, dtype=torch.uint8)
    target[:, N_LETTERS + 3::3] = 1 + two.long()  # the answers: 1 = 1-hop, 2 = 2-hop
    return dict(ids=ids.flatten().int(), target=target.flatten(), start=torch.zeros(n, dtype=torch.long),
                offsets=torch.arange(n + 1) * ids.shape[1], train=torch.arange(n_held, n), held=torch.arange(n_held))


def read_jsonl(path: str):
    """Yields (prompt messages, response) from lines {"question", "generation"} or {"messages": [...]}."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                msgs = r["messages"] if "messages" in r else [{"role": "user", "content": r["question"]},
                                                              {"role": "assistant", "content": r["generation"]}]
                if msgs[-1]["role"] != "assistant" or not all(isinstance(m["content"], str) for m in msgs):
                    raise ValueError("the last message must be the assistant's and every content a string")
            except (ValueError, KeyError, TypeError, IndexError) as e:
                raise ValueError(f"{path}:{n}: bad line ({type(e).__name__}: {e}). Each line must be a JSON object "
                                 "with 'question' and 'generation' strings, or 'messages' ending with the "
                                 "assistant's") from None
            yield msgs[:-1], msgs[-1]["content"]


def openr1_rows():
    """OpenR1-Math-220k, default subset: per problem the shortest (in characters) verified-correct generation."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        sys.exit('reading OpenR1-Math needs pyarrow: pip install -e ".[data]" (or pass --data FILE.jsonl)')
    try:
        from huggingface_hub import snapshot_download
        d = Path(snapshot_download("open-r1/OpenR1-Math-220k", repo_type="dataset", allow_patterns=["data/*.parquet"]))
    except Exception as e:
        sys.exit(f"could not download open-r1/OpenR1-Math-220k ({type(e).__name__}); pass --data FILE.jsonl instead")
    for f in sorted(d.glob("data/*.parquet")):
        for r in pq.read_table(f, columns=["problem", "generations", "correctness_math_verify"]).to_pylist():
            ok = [g for g, c in zip(r["generations"], r["correctness_math_verify"]) if c]
            if ok:
                yield [{"role": "user", "content": r["problem"]}], min(ok, key=len)


def chat_data(rows, tok: tah.Tokenizer, max_len: int, run) -> dict:
    """Qwen3 chat format: the prompt up to "<|im_start|>assistant\\n", then the scored response
    "<think>...</think>...<|im_end|>\\n". Rows of max_len tokens or more are dropped; 99/1 split, seed 42."""
    seqs, start, dropped, enc = [], [], 0, functools.partial(tok.tok.encode_batch, add_special_tokens=False)
    for chunk in iter(lambda: list(itertools.islice(rows, 1024)), []):  # in batches: the tokenizer runs in parallel
        for p, r in zip(enc([tok.chat(m, add_generation_prompt=True) for m, _ in chunk]),
                        enc([r + "<|im_end|>\n" for _, r in chunk])):
            if len(p.ids) + len(r.ids) >= max_len:
                dropped += 1
            else:
                seqs.append(torch.tensor(p.ids + r.ids, dtype=torch.int32))
                start.append(len(p.ids))
        if (len(seqs) + dropped) % 16384 < len(chunk):
            run.log(f"data: {len(seqs) + dropped} examples tokenized")
    if len(seqs) < 2:
        sys.exit(f"only {len(seqs)} usable examples ({dropped} have >= {max_len} tokens): "
                 "more data or a larger --max-len")
    run.log(f"data: {len(seqs)} examples kept, {dropped} dropped for having >= {max_len} tokens")
    lens, start = torch.tensor([len(s) for s in seqs]), torch.tensor(start)
    offsets, row = F.pad(lens.cumsum(0), (1, 0)), torch.repeat_interleave(torch.arange(len(seqs)), lens)
    target = (torch.arange(int(lens.sum())) - offsets[row] >= start[row]).to(torch.uint8)
    perm, n_held = torch.randperm(len(seqs), generator=torch.Generator().manual_seed(42)), max(1, len(seqs) // 100)
    return dict(ids=torch.cat(seqs), target=target, offsets=offsets, start=start, train=perm[n_held:],
                held=perm[:n_held])


def spans(data: dict, idx) -> list[tuple[int, int]]:
    return [(int(data["offsets"][i]), int(data["offsets"][i + 1])) for i in torch.as_tensor(idx).tolist()]


def make_batch(data: dict, idx, labels=None, device="cpu") -> dict:
    """Right-padded (B, T) tensors. At position t: tgt = the token t must predict (-100 if unscored), kind =
    that target's kind, passes = the oracle's passes for t (1 where unknown or padding)."""
    sp = spans(data, idx)
    ids, kind, passes = (torch.zeros(len(sp), max(e - a for a, e in sp), dtype=torch.long) for _ in range(3))
    valid = torch.zeros_like(ids, dtype=torch.bool)
    for r, (a, e) in enumerate(sp):
        ids[r, :e - a], kind[r, :e - a], valid[r, :e - a] = data["ids"][a:e], data["target"][a:e], True
        passes[r, :e - a] = labels[a:e] if labels is not None else 1
    kind = F.pad(kind[:, 1:], (0, 1))  # (B, T): a target's kind moves to its predicting position
    tgt = torch.where(kind > 0, F.pad(ids[:, 1:], (0, 1)), -100)
    b = dict(ids=ids, valid=valid, tgt=tgt, kind=kind, passes=passes.clamp(min=1), start=data["start"][idx])
    return {k: v.to(device) for k, v in b.items()}


def batch_indices(seed: int, step: int, n: int, batch: int) -> torch.Tensor:
    """Train rows (0..n-1) of one optimizer step, a function of (seed, step) alone: resuming needs no loader
    state, and processes can shard it. Epoch e walks a permutation seeded by (seed, e)."""
    g = torch.arange(step * batch, (step + 1) * batch)  # global sample counter
    return torch.cat([torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + e))[g[g // n == e] % n]
                      for e in (g // n).unique().tolist()])


# ----------------------------------------------------------------------------- oracle labels, losses, the step


def oracle_labels(pred: torch.Tensor, ids: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
    """Passes (B, T): 2 at candidate positions t whose greedy prediction pred[t] is not token t+1, else 1."""
    nxt = F.pad(ids[:, 1:], (0, 1), value=-1)  # the last position has no next token: never hard
    return 1 + (candidate & (pred != nxt) & (nxt >= 0)).long()


def chunked_ce(logits: torch.Tensor, tgt: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Summed cross-entropy, upcast to fp32 one chunk of positions at a time; in training each chunk is
    recomputed in backward, so no fp32 (T, V) buffer ever lives."""
    def ce(lg, y):
        return F.cross_entropy(lg.float().flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum")
    return sum(checkpoint(ce, logits[:, i:i + chunk], tgt[:, i:i + chunk], use_reentrant=False) if logits.requires_grad
               else ce(logits[:, i:i + chunk], tgt[:, i:i + chunk]) for i in range(0, logits.shape[1], chunk))


def lm_loss(model, b: dict, policy: str):
    """Next-token CE over the scored tokens under `policy` ("oracle" = the labels in b["passes"])."""
    out = model(b["ids"], b["passes"] if policy == "oracle" else policy, valid=b["valid"])
    return chunked_ce(out.logits, b["tgt"]), int((b["tgt"] >= 0).sum())


def decider_loss(model, b: dict, pos_weight: float):
    """BCE of the decider's pass-1 logit against the oracle labels at every real token. Pass 2 never runs:
    policy "standard" still evaluates the decider of a model that has one."""
    logit = model(b["ids"], "standard", valid=b["valid"]).continue_logit
    bce = F.binary_cross_entropy_with_logits(logit.float(), (b["passes"] > 1).float(), reduction="none",
                                             pos_weight=torch.tensor(pos_weight, device=logit.device))
    return (bce * b["valid"]).sum(), int(b["valid"].sum())


def train_step(run: Run, model, opt, batches: list[dict], loss_fn, seed: int) -> float:
    """One optimizer step over this process's micro-batches: gradients summed over them and over the processes,
    divided by the token count of the whole step, clipped by their global norm (the step one process would
    take alone). A non-finite loss or gradient skips the update (the caller stops)."""
    total, count, sharded = 0.0, 0, isinstance(model, FSDPModule)
    for i, b in enumerate(batches):
        # dropout masks from (step, micro-batch): the same on any number of processes, nothing to save
        torch.manual_seed(hash((seed, run.rank * len(batches) + i)))
        if sharded:  # FSDP sums the gradients over the processes once, in the last backward
            model.set_requires_gradient_sync(i == len(batches) - 1)
        with run.amp():
            loss, n = loss_fn(model, b)
        loss.backward()
        total, count = total + loss.item(), count + n
    total, count = run.sum(total, count)
    params = [p for g in opt.param_groups for p in g["params"]]
    for p in params:
        if p.grad is None:  # unused in this step (LoRA, if no token was hard): each process must send a gradient
            p.grad = torch.zeros_like(p)
        if run.world > 1 and not sharded:  # data-parallel: sum over the processes (what DDP does, in buckets)
            dist.all_reduce(p.grad)
        p.grad.div_(max(count, 1))
    norm = torch.nn.utils.clip_grad_norm_(params, run.args.clip)  # sharded: a DTensor, the norm of all shards
    if math.isfinite(total) and math.isfinite(norm.full_tensor() if sharded else norm):
        opt.step()
    opt.zero_grad(set_to_none=True)
    return total / max(count, 1)


# ----------------------------------------------------------------------------- processes, side effects, stages
WHOLE = StateDictOptions(full_state_dict=True, cpu_offload=True)  # tensors gathered whole on rank 0's CPU (else {})
TRAINED = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)  # those that train


class Run:
    """The settings, the device, the processes (under torchrun) and every write: rank 0's alone, each atomic."""

    def __init__(self, args):
        self.args, self.out, self.stop, self.steps_done = args, Path(args.out), False, 0
        self.out.mkdir(parents=True, exist_ok=True)
        self.device = torch.device(args.device or tah.default_device())
        self.tokenizer_dir = self.out / "tokenizer" if args.size == "toy" else tah.resolve(args.model)
        self.rank, self.world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        if "RANK" in os.environ:  # started by torchrun: one process per GPU (gloo: processes on a CPU)
            cuda = self.device.type == "cuda"
            self.device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
            # a long timeout: the other processes wait at a barrier while rank 0 makes the data and labels
            dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(hours=12),
                                    device_id=self.device if cuda else None)
        elif args.shard:
            sys.exit("--shard splits the model over processes: start them with torchrun --nproc_per_node N train.py")
        if args.batch % self.world:
            sys.exit(f"--batch {args.batch} must be a multiple of the number of processes ({self.world})")

    def amp(self):
        return torch.autocast(self.device.type, torch.bfloat16, enabled=self.args.dtype == "bfloat16")

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def sum(self, *values: float) -> list[float]:
        """The values summed over the processes (as they are in one process)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device if dist.is_initialized() else "cpu")
        if dist.is_initialized():
            dist.all_reduce(t)
        return t.tolist()

    def log(self, msg: str) -> None:
        if self.rank == 0:
            print(msg, flush=True)
            with open(self.out / "train.log", "a") as f:
                f.write(msg + "\n")

    def write(self, name: str, obj) -> None:
        """out/name, whole or not at all: *.safetensors from tensors, *.pt by torch.save, else text."""
        if self.rank:
            return
        tmp = self.out / f".{name}.tmp"
        if name.endswith(".safetensors"):  # as bytes: save_file would make a file only its owner can read
            tmp.write_bytes(safetensors_bytes(obj))
        elif name.endswith(".pt"):
            torch.save(obj, tmp)
        else:
            tmp.write_text(obj)
        os.replace(tmp, self.out / name)


def train(run: Run, name: str, make, loss_fn, steps: int, lr: float, data: dict, labels=None, offset: int = 0):
    """out/name if that stage finished before, else make() with its parameters that require grad trained for
    `steps` steps (on the data of steps offset + step), after an estimate for the real sizes, then saved as
    out/name. Resumes from out/name.state.pt; Ctrl-C (or --stop-after) saves that state and exits."""
    a, state_path = run.args, run.out / f"{name}.state.pt"
    if a.resume and (run.out / name).exists():
        run.log(f"{name}: finished before, loading {run.out / name}")
        return load(run, run.out / name)
    torch.manual_seed(a.seed)  # the same initialisation (LoRA, decider) whether fresh or resumed
    model = make()
    # recompute layers in backward (4096 tokens fit 24 GB); not for a decider, whose gradient stops at its inputs
    model.grad_checkpointing = a.size != "toy" and model.decider is None
    if a.shard:  # FSDP2 with the whole model as one unit: weights, gradients and AdamW state lie split over the
        # processes and are gathered whole for each micro-batch. Not one unit per layer: those need every process
        # to make the same layer calls, and TaH runs its layers again only for micro-batches with hard tokens.
        fully_shard(model)
        model.set_reduce_scatter_unused_params(True)  # a parameter one process left unused gets its zeros
        model.set_gradient_divide_factor(1.0)  # sums, not means: train_step divides by the token count
        model.set_force_sum_reduction_for_comms(True)  # as a plain SUM, which gloo has too
    if a.size != "toy":
        estimate(run, name, model, loss_fn, data, labels, steps)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": a.weight_decay},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}], lr=lr)
    start = 0
    if a.resume and state_path.exists():  # whole tensors by name, for any number of processes, sharded or not
        s = torch.load(state_path, map_location="cpu", weights_only=True)
        set_model_state_dict(model, s["params"], options=StateDictOptions(full_state_dict=True, strict=False))
        set_optimizer_state_dict(model, opt, s["optim"], options=StateDictOptions(full_state_dict=True))
        start = int(s["step"])
        run.log(f"{name}: resuming at step {start}/{steps}")
    run.barrier()  # every process has looked for out/name and the state before rank 0 may write them
    old = signal.signal(signal.SIGINT, lambda *_: setattr(run, "stop", True))  # stop between steps, never inside
    t0, tokens, warm = time.time(), 0, max(1, round(a.warmup * steps))
    try:
        for step in range(start, steps):
            idx = data["train"][batch_indices(a.seed, offset + step, len(data["train"]), a.batch)]
            idx = idx.tensor_split(run.world)[run.rank]  # this process's share of the step's rows
            batches = [make_batch(data, idx[i:i + a.micro_batch], labels, run.device)
                       for i in range(0, len(idx), a.micro_batch)]
            for g in opt.param_groups:  # linear warm-up, then a cosine from lr down to 0.1 lr
                g["lr"] = lr * ((step + 1) / warm if step < warm else
                                0.55 + 0.45 * math.cos(math.pi * (step - warm) / max(1, steps - 1 - warm)))
            loss = train_step(run, model.train(), opt, batches, loss_fn, seed=hash((a.seed, offset + step)))
            if not math.isfinite(loss):
                run.log(f"{name}: loss is {loss} at step {step + 1}; stopping. The last good state is {state_path} "
                        "(if any): lower --lr or --clip, or use --dtype float32, then rerun to resume from it")
                sys.exit(1)
            run.steps_done += 1
            stop, n = run.sum(run.stop or (a.stop_after is not None and run.steps_done >= a.stop_after),
                              sum(int(b["valid"].sum()) for b in batches))  # Ctrl-C on any process stops all
            tokens += n
            if step % a.log_every == 0 or step == steps - 1:
                dt = time.time() - t0
                run.log(f"{name} step {step + 1}/{steps} loss {loss:.4f} lr {opt.param_groups[0]['lr']:.2e} "
                        f"{tokens / dt:.0f} tok/s ETA {(steps - step - 1) * dt / (step + 1 - start) / 60:.1f} min")
            if stop or (a.save_every and (step + 1) % a.save_every == 0):  # whole tensors, by parameter name
                run.write(state_path.name, dict(step=step + 1, params=get_model_state_dict(model, options=TRAINED),
                                                optim=get_optimizer_state_dict(model, opt, options=WHOLE)))
            if stop:
                run.log(f"{name}: interrupted after step {step + 1}, state saved: rerun the same command to resume")
                sys.exit(130)
    finally:
        signal.signal(signal.SIGINT, old)
    if a.shard:  # gathered whole on rank 0's CPU into a plain model (the other processes get {})
        state = get_model_state_dict(model, options=WHOLE)
        with torch.device("meta"):
            model = tah.TaH(model.config, model.tah)
        if run.rank == 0:
            model.load_state_dict(state, assign=True)
    if run.rank == 0:
        tah.save(model, run.out / name, tokenizer_dir=run.tokenizer_dir)
    run.barrier()
    state_path.unlink(missing_ok=True)
    return load(run, run.out / name) if a.shard else model.eval()  # sharded: on run.device, whole


def load(run: Run, path, t: tah.TaHConfig | None = None):
    model = tah.load(path, device=run.device, dtype=torch.float32)  # fp32 master weights; bf16 by autocast
    return model if t is None else tah.add_parts(model, t)  # a fresh LoRA or decider where t asks for one


def estimate(run: Run, name: str, model, loss_fn, data, labels, steps: int) -> None:
    """Times a micro-batch of the longest rows (on CUDA also its peak memory) and extrapolates to the stage;
    stops, naming the flag to change, if the GPU is too small."""
    a, cuda = run.args, run.device.type == "cuda"
    lens = (data["offsets"][1:] - data["offsets"][:-1])[data["train"]]
    b = make_batch(data, data["train"][lens.argsort(descending=True)[:a.micro_batch]], labels, run.device)
    advice = f"lower --max-len (now {a.max_len}), use a bigger GPU, or several with torchrun and --shard"
    try:
        for _ in range(2):  # the second one is timed: the first pays for warm-up
            t = time.time()
            with run.amp():
                loss_fn(model.train(), b)[0].backward()
            if cuda:
                torch.cuda.synchronize()
    except torch.OutOfMemoryError:
        sys.exit(f"{name}: out of GPU memory on {a.micro_batch} row(s) of {b['ids'].shape[1]} tokens: {advice}")
    dt, n = time.time() - t, int(b["valid"].sum())
    model.zero_grad(set_to_none=True)
    tokens = float(lens.float().mean()) * a.batch * steps
    each = f" in each of {run.world} processes" if run.world > 1 else ""
    msg = (f"{name}: {n / dt:.0f} tok/s on the longest rows{each}: {tokens / 1e6:.1f}M tokens take "
           f"~{tokens * dt / n / run.world / 3600:.1f}h")
    if cuda:  # the measured peak plus AdamW's two fp32 moments (this process's share), which the first step allocates
        adam = 8 * sum(p.numel() for p in model.parameters() if p.requires_grad) / (run.world if a.shard else 1)
        peak = torch.cuda.max_memory_allocated() + adam
        total = torch.cuda.get_device_properties(run.device).total_memory
        msg += f"; peak memory ~{peak / 2**30:.1f} of {total / 2**30:.1f} GiB"
        if peak > 0.97 * total and not a.skip_memory_check:
            sys.exit(f"{msg}\nthis GPU is too small: {advice}; or pass --skip-memory-check to try anyway")
    run.log(msg + " (--samples, --epochs and --max-len set the budget)")


@torch.no_grad()
def compute_labels(run: Run, reference, data: dict, idx) -> torch.Tensor:
    """Oracle passes (flat uint8, aligned with data["ids"]) for rows idx, from one greedy teacher-forced
    forward of the frozen reference(); stored once, resumable from labels.partial.safetensors. Rank 0 makes
    them; the other processes wait for the file."""
    path, partial = run.out / "labels.safetensors", run.out / "labels.partial.safetensors"
    if run.rank > 0 or (run.args.resume and path.exists()):
        run.barrier()
        return load_file(path)["labels"]
    s = load_file(partial) if run.args.resume and partial.exists() else {}
    labels, done = s.get("labels", torch.ones(len(data["ids"]), dtype=torch.uint8)), int(s.get("done", 0))
    ref, bs, t0, last = reference().eval(), run.args.micro_batch, time.time(), time.time()
    if int(data["ids"].max()) >= ref.config.vocab_size:
        sys.exit(f"the reference's vocabulary ({ref.config.vocab_size} tokens) does not cover the data's token ids")
    for i in range(done, len(idx), bs):
        b = make_batch(data, idx[i:i + bs], device=run.device)
        with run.amp():
            pred = ref(b["ids"], "standard", valid=b["valid"]).logits.argmax(-1)
        response = torch.arange(pred.shape[1], device=pred.device) >= b["start"][:, None]  # from <think> on
        lab = oracle_labels(pred, b["ids"], (b["tgt"] >= 0) & response).cpu()
        for r, (a, e) in enumerate(spans(data, idx[i:i + bs])):
            labels[a:e] = lab[r, :e - a]
        if time.time() - last > 60 and i + bs < len(idx):
            last = time.time()
            run.write(partial.name, dict(labels=labels, done=torch.tensor(i + bs)))
            eta = (len(idx) - i - bs) * (last - t0) / (i + bs - done) / 60
            run.log(f"labels: {i + bs}/{len(idx)} rows, ETA {eta:.1f} min")
    run.write(path.name, dict(labels=labels))
    partial.unlink(missing_ok=True)
    hard, scored = (sum(int(x[a:e].sum()) for a, e in spans(data, idx)) for x in (labels == 2, data["target"] > 0))
    run.log(f"labels: {hard} of {scored} scored tokens are hard for the reference ({hard / max(scored, 1):.1%})")
    run.barrier()
    return labels


@torch.no_grad()
def evaluate(run: Run, model, data: dict, labels, policy: str) -> dict:
    """Loss, next-token accuracy and share of iterating positions over the held-out scored predictions;
    iterating_all: the share over all tokens; acc_easy/acc_hard: per target kind (toy: 1-hop/2-hop)."""
    s, idx, bs = torch.zeros(10, dtype=torch.float64), data["held"], run.args.micro_batch
    for i in range(run.rank * bs, len(idx), run.world * bs):  # this process's share of the micro-batches
        b = make_batch(data, idx[i:i + bs], labels, run.device)
        with run.amp():
            p = b["passes"] if policy == "oracle" else policy
            out = model(b["ids"], p, valid=b["valid"], threshold=run.args.threshold)
        m, ok, easy, hard = b["tgt"] >= 0, out.logits.argmax(-1) == b["tgt"], b["kind"] == 1, b["kind"] == 2
        s += torch.tensor([chunked_ce(out.logits, b["tgt"]).item(), (ok & m).sum(), m.sum(),
                           (out.iter_count[m] > 1).sum(), (ok & easy).sum(), easy.sum(), (ok & hard).sum(), hard.sum(),
                           ((out.iter_count > 1) & b["valid"]).sum(), b["valid"].sum()], dtype=torch.float64)
    s = run.sum(*s.tolist())
    r = dict(loss=s[0] / s[2], acc=s[1] / s[2], iterating=s[3] / s[2], iterating_all=s[8] / s[9]) | \
        (dict(acc_easy=s[4] / s[5], acc_hard=s[6] / s[7]) if s[7] else {})
    return {k: round(float(v), 4) for k, v in r.items()}


@torch.no_grad()
def prune_choice(model, batches: list[dict], amp) -> tuple[int, float, list[float]]:
    """Held-out loss per token of the model and of the model without each decoder layer in turn; returns
    the layer whose removal raises the loss least (the model is given back whole)."""
    layers, L = model.model.layers, model.config.num_hidden_layers

    def loss():
        with amp():
            r = [lm_loss(model, b, "standard") for b in batches]
        return sum(float(x) for x, _ in r) / max(1, sum(n for _, n in r))
    base, losses = loss(), []
    try:
        for i in range(L):
            model.model.layers = torch.nn.ModuleList(m for j, m in enumerate(layers) if j != i)
            model.config.num_hidden_layers = L - 1
            losses.append(loss())
    finally:
        model.model.layers, model.config.num_hidden_layers = layers, L
    return min(range(L), key=losses.__getitem__), base, losses


def fingerprint(model) -> str:
    """sha256 of every tensor but the decider's: stage 2 must leave backbone and LoRA bitwise alone."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        if not k.startswith("decider."):
            h.update(k.encode() + v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- the pipeline


def tah_settings(a, decider: bool) -> tah.TaHConfig:
    r, alpha, dropout = a.lora
    return tah.TaHConfig(input_topk=a.input_topk, lora_r=r, lora_alpha=alpha, lora_dropout=dropout,
                         decider_layers=list(a.decider_layers) if decider else None, decider_topk=a.decider_topk,
                         decider_dims=list(a.decider_dims), threshold=a.threshold)


def train_tah(run: Run, base, data: dict, labels, steps: int, decider_steps: int, offset: int = 0):
    """Stage 1: backbone + LoRA under the oracle labels. Stage 2: a fresh decider alone, by BCE."""
    a, config = run.args, json.loads((tah.resolve(base) / "config.json").read_text())
    if not all(0 <= i <= config["num_hidden_layers"] for i in a.decider_layers):
        sys.exit(f"--decider-layers {a.decider_layers}: indices must lie in 0..{config['num_hidden_layers']}")
    before = fingerprint(train(run, "stage1", lambda: load(run, base, tah_settings(a, False)),
                               functools.partial(lm_loss, policy="oracle"), steps, a.lr, data, labels, offset))
    sp = spans(data, torch.cat([data["train"][batch_indices(a.seed, offset + s, len(data["train"]), a.batch)]
                                for s in range(decider_steps)]))
    pos = sum(int((labels[s:e] == 2).sum()) for s, e in sp)
    pos_weight = a.pos_weight or (sum(e - s for s, e in sp) - pos) / max(pos, 1)  # 0 means negatives / positives
    run.log(f"stage 2: decider BCE with pos_weight {pos_weight:.2f}")

    def decider_only():  # stage 1's model with a fresh decider, the only part that trains
        model = load(run, run.out / "stage1", tah_settings(a, True))
        for n, p in model.named_parameters():
            p.requires_grad = n.startswith("decider.")
        return model
    model = train(run, "tah", decider_only, functools.partial(decider_loss, pos_weight=pos_weight), decider_steps,
                  a.decider_lr, data, labels, offset)
    if fingerprint(model) != before:
        raise RuntimeError("stage 2 changed the backbone or the LoRA; only the decider may train")
    run.log(f"stage 2: backbone and LoRA bitwise unchanged (sha256 {before[:16]})")
    return model


def report(run: Run, models: dict, data: dict, labels) -> dict:
    """Evaluates each model under its policies on the held-out rows; keeps eval.json, prints the table
    (iter% = share of the scored predictions that iterate, all% = of all tokens)."""
    path, toy = run.out / "eval.json", run.args.size == "toy"
    res = json.loads(path.read_text()) if run.args.resume and path.exists() else {}
    for name, (model, policies) in models.items():
        for p in policies:
            if p not in res.get(name, {}):
                run.log(f"evaluating {name} with policy {p} on {len(data['held'])} held-out rows")
                res.setdefault(name, {})[p] = evaluate(run, model.eval(), data, labels, p)
                run.write("eval.json", json.dumps(res, indent=2))
    run.log(f"\n{'model':14} {'policy':9} {'loss':>7} {'acc':>6} {'iter%':>6} {'all%':>6}" +
            (f" {'1-hop':>6} {'2-hop':>6}" if toy else ""))
    for name, per in res.items():
        for p, r in per.items():
            run.log(f"{name:14} {p:9} {r['loss']:7.4f} {r['acc']:6.3f} {100 * r['iterating']:6.1f} "
                    f"{100 * r['iterating_all']:6.1f}" + (f" {r['acc_easy']:6.3f} {r['acc_hard']:6.3f}" if toy else ""))
    return res


def get_data(run: Run) -> dict:
    """out/data.safetensors, made by rank 0 (the other processes wait for it) unless resuming."""
    a, path = run.args, run.out / "data.safetensors"
    if run.rank == 0 and not (a.resume and path.exists()):
        if a.size == "toy":  # with a word-level tokenizer.json, so generate.py reads prompts like "A>C B>J | 2: A"
            from tokenizers import Tokenizer, models, pre_tokenizers
            tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(TOY_VOCAB)}, unk_token="<unk>"))
            tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
            run.tokenizer_dir.mkdir(exist_ok=True)
            tok.save(str(run.tokenizer_dir / "tokenizer.json"))
            data = toy_data(a.batch * (a.pretrain_steps + a.steps) + a.eval_samples, a.eval_samples, a.seed)
        else:
            rows = read_jsonl(a.data) if a.data else openr1_rows()
            data = chat_data(rows, tah.load_tokenizer(run.tokenizer_dir), a.max_len, run)
        run.write(path.name, data)
    run.barrier()
    data = load_file(path)
    data["train"] = data["train"][:a.samples] if a.samples else data["train"]
    data["held"] = data["held"][:a.eval_samples]
    return data


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    run = Run(a)
    run.log(f"\n$ python train.py {' '.join(sys.argv[1:] if argv is None else argv)}  (device {run.device}"
            + (f", {run.world} processes)" if "RANK" in os.environ else ")"))
    volatile = {"resume", "stop_after", "log_every", "save_every", "threads", "device", "skip_memory_check", "baseline",
                "shard"}
    keep = json.loads(json.dumps({k: v for k, v in vars(a).items() if k not in volatile}))
    old = json.loads((run.out / "settings.json").read_text()) if (run.out / "settings.json").exists() else keep
    if a.resume and old != keep:
        sys.exit(f"{run.out} holds a run with other settings ({', '.join(k for k in keep if old.get(k) != keep[k])})"
                 ": use another --out, the same flags, or --no-resume to start over")
    run.write("settings.json", json.dumps(keep, indent=1))
    data, lm, S, P = get_data(run), functools.partial(lm_loss, policy="standard"), a.steps, a.pretrain_steps
    if a.size == "toy":  # Standard first: the baseline, the oracle's reference and stage 1's starting point
        cfg = tah.Qwen3Config(vocab_size=len(TOY_VOCAB), hidden_size=64, intermediate_size=192, num_hidden_layers=1,
                              num_attention_heads=4, num_key_value_heads=4, head_dim=16, rope_theta=1e4,
                              max_position_embeddings=128, tie_word_embeddings=False, torch_dtype="float32")
        std = train(run, "standard", lambda: tah.TaH(cfg).to(run.device), lm, P, a.lr, data)
        rows = torch.cat([batch_indices(a.seed, P + s, len(data["train"]), a.batch)
                          for s in range(max(S, a.decider_steps))])  # the rows stages 1 and 2 read
        labels = compute_labels(run, lambda: std, data, torch.cat([data["train"][rows.unique()], data["held"]]))
        model = train_tah(run, run.out / "standard", data, labels, S, a.decider_steps, offset=P)
        long = train(run, "standard-long", lambda: load(run, run.out / "standard"), lm, S, a.lr, data, None, P)
        always = train(run, "always", lambda: load(run, run.out / "standard", tah_settings(a, False)),
                       functools.partial(lm_loss, policy="always"), S, a.lr, data, None, P)
        res = report(run, {"standard": (std, ["standard"]), "standard-long": (long, ["standard"]),
                           "always": (always, ["always"]), "tah": (model, POLICIES)}, data, labels)
        tok = tah.load_tokenizer(run.tokenizer_dir)
        run.log("\nheld-out 2-hop queries (table | ... query -> TaH's answer with the decider, passes, truth):")
        for i, j in spans(data, data["held"][:4]):
            ids, p = data["ids"][i:j].long(), int(torch.nonzero(data["target"][i:j] == 2)[0])  # the first 2-hop answer
            token, passes = next(tah.generate(model, ids[:p].to(run.device), 1, policy="decider"))
            run.log(f"  {tok.decode(ids[:N_LETTERS + 1].tolist())} ... {tok.decode(ids[p - 2:p].tolist())} -> "
                    f"{tok.decode([int(token)])} (passes {int(passes)}; truth {tok.decode([int(ids[p])])})")
        return res
    steps = S or math.ceil(len(data["train"]) * a.epochs / a.batch)
    decider_steps = a.decider_steps or math.ceil(len(data["train"]) * a.decider_epochs / a.batch)
    if a.baseline:  # the paper's Standard: the same data and budget, no iteration, no LoRA
        model = train(run, "baseline", lambda: load(run, a.model), lm, steps, a.lr, data)
        return report(run, {"baseline": (model, ["standard"])}, data, None)
    base = run.out / "pruned" if a.prune else a.model
    if a.prune and run.rank == 0 and not (a.resume and base.exists()):  # "TaH": remove the least useful layer
        model = load(run, a.model).eval()
        held = [make_batch(data, data["held"][i:i + 1], None, run.device) for i in range(min(8, len(data["held"])))]
        layer, loss, losses = prune_choice(model, held, run.amp)
        run.log(f"prune: held-out loss {loss:.4f}, without each layer {[round(x, 4) for x in losses]}: "
                f"removing layer {layer}")
        model.model.layers = torch.nn.ModuleList(m for j, m in enumerate(model.model.layers) if j != layer)
        model.config.num_hidden_layers -= 1
        run.write("prune.json", json.dumps(dict(removed=layer, loss=loss, loss_without=losses), indent=2))
        tah.save(model, base, tokenizer_dir=run.tokenizer_dir)
    run.barrier()  # the other processes read out/pruned
    reference = functools.partial(tah.load, a.reference, device=run.device,
                                  dtype=torch.bfloat16 if a.dtype == "bfloat16" else torch.float32)
    labels = compute_labels(run, reference, data, torch.cat([data["train"], data["held"]]))
    return report(run, {"tah": (train_tah(run, base, data, labels, steps, decider_steps), POLICIES)}, data, labels)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--size", choices=list(SIZES), default="toy", help="toy (CPU, minutes), 0.6b (a 24 GB GPU), 1.7b (> 24 GB)")
    add("--model", help="backbone to train: hub id or directory (default Qwen/Qwen3-<size>-Base)")
    add("--reference", help="frozen model whose greedy misses are the oracle labels (default Qwen/Qwen3-<size>)")
    add("--data", help="JSONL of {question, generation} or {messages} lines (default: OpenR1-Math-220k)")
    add("--out", help="directory every stage writes to (default runs/<size>)")
    add("--max-len", type=int, help="drop rows of this many tokens or more (0.6b: 4096 fits 24 GB; paper 8192)")
    add("--samples", type=int, help="train on this many examples (0 = all ~94k; default 12800)")
    add("--epochs", type=float, help="stage-1 epochs over --samples (published 5; default 1)")
    add("--decider-epochs", type=float, help="stage-2 epochs (published 2)")
    add("--pretrain-steps", type=int, help="toy: steps of the Standard model trained from scratch (600)")
    add("--steps", type=int, help="stage-1 optimizer steps (and each toy baseline's); overrides --epochs")
    add("--decider-steps", type=int, help="stage-2 optimizer steps; overrides --decider-epochs")
    add("--batch", type=int, help="rows per optimizer step (published 128; toy 64)")
    add("--micro-batch", type=int, help="rows per forward; batch / micro-batch = gradient accumulation")
    add("--lr", type=float, help="peak learning rate of stage 1 and the baselines (0.6b 4e-5)")
    add("--decider-lr", type=float, help="peak learning rate of stage 2 (published 3e-5)")
    add("--warmup", type=float, help="fraction of the steps with linear warm-up (then a cosine to 0.1 lr)")
    add("--weight-decay", type=float, help="AdamW weight decay on matrices (published 0.01)")
    add("--clip", type=float, help="gradient-norm clipping (published 0.2)")
    add("--pos-weight", type=float, help="stage-2 BCE weight of hard tokens (0.6b 4.8, 1.7b 5.4; 0 = neg/pos)")
    add("--threshold", type=float, help="decider threshold for evaluation and the saved model (published 0.9)")
    add("--decider-layers", type=int, nargs="+", help="hidden states the decider reads (0 = embeddings, k = layer k)")
    add("--prune", action="store_true", help='"TaH": first remove the layer whose removal hurts least')
    add("--baseline", action="store_true", help="train the paper's Standard model instead (no iteration, no LoRA)")
    add("--eval-samples", type=int, help="held-out rows to evaluate on (toy 1000, else 200)")
    add("--device", help="cuda, mps or cpu (default: the first available)")
    add("--dtype", choices=["float32", "bfloat16"], help="autocast dtype (default bfloat16 for 0.6b/1.7b on a GPU)")
    add("--seed", type=int, default=0, help="seed of the initialisation, the data order and the toy data")
    add("--threads", type=int, default=0, help="CPU threads for PyTorch (0 = its default)")
    add("--log-every", type=int, help="log progress every this many steps (toy 100, else 1)")
    add("--save-every", type=int, help="save the state every this many steps (0: on Ctrl-C only; toy 0, else 10)")
    add("--resume", action=argparse.BooleanOptionalAction, default=True,
        help="skip finished stages and resume an interrupted one (--no-resume: start over in --out)")
    add("--stop-after", type=int, help="testing: act as if Ctrl-C came after this many optimizer steps")
    add("--skip-memory-check", action="store_true", help="train even if the memory estimate exceeds the GPU")
    add("--shard", action="store_true", help="under torchrun: weights, gradients and AdamW state split over the "
        "processes (FSDP2), for a model whose training does not fit one GPU")
    a = p.parse_args(argv)
    for k, v in SIZES[a.size].items():
        setattr(a, k, v if getattr(a, k, None) is None else getattr(a, k))
    gpu = a.size != "toy" and (a.device or tah.default_device()).startswith("cuda")
    a.out, a.dtype = a.out or f"runs/{a.size}", a.dtype or ("bfloat16" if gpu else "float32")
    a.log_every = a.log_every or (100 if a.size == "toy" else 1)
    a.save_every = (0 if a.size == "toy" else 10) if a.save_every is None else a.save_every
    return a


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # outside a training loop (data, labels, evaluation)
        sys.exit("interrupted: finished stages are kept; rerun the same command to go on")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
