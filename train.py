"""Train Think-at-Hard end to end: data, oracle labels, (pruning), stage 1, stage 2, evaluation.

    python train.py                         # toy: a 68k-parameter Qwen3, a look-up task, CPU
    python train.py --size 0.6b             # Qwen3-0.6B-Base on OpenR1-Math: one 24 GB GPU, hours
    python train.py --size 0.6b --baseline  # Standard: the same data and budget, no iteration
    python train.py --size 0.6b --baseline always   # AlwaysThink: every token iterates
    python train.py --size 0.6b --prune     # "TaH": first drop the least useful layer
    python train.py --size 0.6b --data my.jsonl     # {"question", "generation"} or {"messages"}
    torchrun --nproc_per_node 8 train.py --size 1.7b   # data-parallel: the same steps, faster

Every stage writes under --out (data.safetensors, labels.safetensors, a checkpoint per stage: tah/
is the final model, eval.json, train.log). Rerunning the command skips finished stages and resumes
an interrupted one, bitwise on a CPU; Ctrl-C saves and exits. The toy: a table maps 10 letters to
each other; a query asks for table[x] (1-hop) or table[table[x]] (2-hop).

Where --size 0.6b/1.7b differs from the authors' recipe (arXiv 2511.08577; the README lists all):
12,800 rows for 1 epoch (theirs: ~94k rows, 5 epochs; --samples 0 --epochs 5); fp32 weights, AdamW
state under bf16 autocast (rows cut at their 8192 / 10000 tokens). The closing table is next-token
accuracy on held-out rows; bench/eval.py --model OUT/tah paper scores the paper's benchmarks.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shlex
import signal
import sys
import time
from datetime import timedelta
from functools import partial
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: on a shared CPU, spinning made the toy's tiny ops
# ~15x slower with 2 threads. It has to be set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import load_file, save as safetensors_bytes  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402

import tah  # noqa: E402

# The argparse defaults are the 0.6b recipe; the other sizes change these (--help shows them).
SIZES = {"0.6b": {}}
SIZES["1.7b"] = dict(
    model="Qwen/Qwen3-1.7B-Base",
    reference="Qwen/Qwen3-1.7B",  # the post-trained model of the same size, as the authors
    max_len=10000,  # the authors' stage 1
    lora_r=32, lora_alpha=64, pos_weight=5.4, decider_layers=[2, 10, 18, 26],
    decider_dims=[512] * 6)
SIZES["toy"] = dict(  # tuned for a CPU and minutes
    model=None, reference=None,  # the toy's own Standard model: stage 1's start and the reference
    pretrain_steps=600,  # that Standard model's steps, from scratch
    steps=600,  # stage 1's steps, and each baseline's
    decider_steps=300,  # stage 2's steps
    samples=0,  # all the rows made: batch x (pretrain_steps + steps)
    max_len=64,  # a toy row has 59 tokens
    pos_weight=0.0,  # 0: negatives per positive in the rows stage 2 reads
    save_every=0,  # on Ctrl-C only
    batch=64, micro_batch=64, lr=3e-3, decider_lr=1e-3, clip=1.0, eval_samples=1000, log_every=100,
    lora_r=8, lora_alpha=16, lora_dropout=0.0, input_topk=8, decider_topk=8, threshold=0.5,
    decider_layers=[0, 1], decider_dims=[64] * 2)
POLICIES = ["standard", "always", "oracle", "decider"]
OPENR1_MAX_TOKENS = 8192  # the authors drop a problem whose chosen generation is this long
PRUNE_ROWS, PRUNE_LEN = 16, 4096  # the authors' pruning calibration: 16 held-out rows, 4096 tokens
CE_CHUNK = 1024  # positions whose logits a step makes at a time (chunked_ce), read at call time

def fail(message) -> None:
    """A mistake the user can mend: one line `error: what was wrong; what to do`, exit code 2."""
    print("error: " + " ".join(str(message).split()), file=sys.stderr, flush=True)
    raise SystemExit(2)


# ----------------------------------------------------------------------------- data
# A data set is flat: ids (all tokens), target (1 = a scored response token; the toy marks 2-hop
# answers 2), offsets (row i is ids[offsets[i]:offsets[i+1]]), start (first position that may
# iterate), train and held (row numbers).

N_LETTERS, N_QUERIES = 10, 16
TOY_VOCAB = ["<unk>", "|", "1:", "2:"] + [chr(65 + i) for i in range(N_LETTERS)] + \
    [f"{chr(65 + k)}>{chr(65 + v)}" for k in range(N_LETTERS) for v in range(N_LETTERS)]
SEP, HOP1, LETTER, PAIR = 1, 2, 4, 4 + N_LETTERS  # token ids: "|", "1:" ("2:" = 3), letters, pairs
TOY_CONFIG = tah.Qwen3Config(vocab_size=len(TOY_VOCAB), hidden_size=64, intermediate_size=192,
                             num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
                             head_dim=16, rope_theta=1e4, max_position_embeddings=128,
                             tie_word_embeddings=False, torch_dtype="float32")

def toy_data(n: int, n_held: int, seed: int) -> dict:
    """n rows `pairs | (marker x answer) * 16`: a random table, a token per pair "k>v", queries."""
    g = torch.Generator().manual_seed(seed)
    table = torch.rand(n, N_LETTERS, generator=g).argsort(1)  # (n, 10): letter k -> table[k]
    order = torch.rand(n, N_LETTERS, generator=g).argsort(1)  # the order the pairs are listed in
    pairs = PAIR + order * N_LETTERS + table.gather(1, order)  # (n, 10)
    x = torch.randint(0, N_LETTERS, (n, N_QUERIES), generator=g)
    two = torch.rand(n, N_QUERIES, generator=g).argsort(1) < N_QUERIES // 2  # half are 2-hop
    once = table.gather(1, x)
    answer = torch.where(two, table.gather(1, once), once)
    queries = torch.stack([HOP1 + two.long(), LETTER + x, LETTER + answer], -1).flatten(1)
    ids = torch.cat([pairs, torch.full((n, 1), SEP), queries], 1)  # (n, 59)
    target = torch.zeros_like(ids, dtype=torch.uint8)
    target[:, N_LETTERS + 3::3] = 1 + two.long()  # the answers: 1 = 1-hop, 2 = 2-hop
    return dict(ids=ids.flatten().int(), target=target.flatten(), start=torch.zeros(n).long(),
                offsets=torch.arange(n + 1) * ids.shape[1], train=torch.arange(n_held, n),
                held=torch.arange(n_held))

def read_jsonl(path: str):
    """Yields (prompt messages, response) from lines {"question", "generation"} or {"messages"}."""
    with open(path, "rb") as f:  # bytes: a line that is not UTF-8 is a bad line like any other
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line.decode("utf-8"))
                msgs = r["messages"] if "messages" in r else [
                    dict(role="user", content=r["question"]),
                    dict(role="assistant", content=r["generation"])]
                if msgs[-1]["role"] != "assistant" or \
                        not all(isinstance(m["content"], str) for m in msgs):
                    raise ValueError("the last message must be the assistant's, contents strings")
            except (ValueError, KeyError, TypeError, IndexError) as e:
                raise ValueError(f"{path}:{n}: bad line ({type(e).__name__}: {e}); each line must "
                                 "be UTF-8 JSON, an object with 'question' and 'generation' "
                                 "strings, or 'messages' ending with the assistant's") from None
            yield msgs[:-1], msgs[-1]["content"]

def choose_generation(problem: dict, n_tokens) -> str | None:
    """The authors' choice for an OpenR1 problem: of the generations math_verify marks correct (or
    else llama), the shortest by n_tokens(texts); None if none, or it has OPENR1_MAX_TOKENS+."""
    for field in ("correctness_math_verify", "correctness_llama"):
        ok = [g for g, c in zip(problem.get("generations") or [], problem.get(field) or [])
              if c and g]
        if ok:
            length, best = min(zip(n_tokens(ok), ok), key=lambda x: x[0])
            return best if length < OPENR1_MAX_TOKENS else None
    return None

def openr1_rows(tok: tah.Tokenizer):
    """(prompt, chosen generation) of each OpenR1-Math-220k problem (default subset) with one."""
    try:
        import pyarrow.parquet as pq
        from huggingface_hub import snapshot_download
        d = Path(snapshot_download("open-r1/OpenR1-Math-220k", repo_type="dataset",
                                   allow_patterns=["data/*.parquet"]))
    except ImportError:
        fail('reading OpenR1-Math needs pyarrow; pip install -e ".[data]", or pass --data FILE')
    except Exception as e:
        fail(f"could not download open-r1/OpenR1-Math-220k ({type(e).__name__}); pass --data FILE")
    n_tokens = lambda texts: [len(e.ids) for e in tok.tok.encode_batch(texts)]  # noqa: E731
    for f in sorted(d.glob("data/*.parquet")):
        for problem in pq.read_table(f).to_pylist():
            if (generation := choose_generation(problem, n_tokens)) is not None:
                yield [dict(role="user", content=problem["problem"])], generation

def chat_data(rows, tok: tah.Tokenizer, max_len: int, long_rows: str, run) -> dict:
    """Qwen3's chat format as its template writes it: the prompt up to "<|im_start|>assistant\\n",
    the scored response "<think>\\n...\\n</think>\\n\\n...<|im_end|>\\n" (an empty think block if
    none). Rows over max_len are cut or left out (long_rows), as are rows with nothing to score."""
    seqs, start, n = [], [], dict(read=0, cut=0, dropped=0, no_think=0)
    encode = partial(tok.tok.encode_batch, add_special_tokens=False)
    for chunk in iter(lambda: list(itertools.islice(rows, 1024)), []):  # batches: in parallel
        prompts = [tok.chat(m) for m, _ in chunk]
        whole = [tok.chat(m + [dict(role="assistant", content=r)], add_generation_prompt=False)
                 for m, r in chunk]
        n["read"] += len(chunk)
        n["no_think"] += sum("</think>" not in r for _, r in chunk)
        for p, r in zip(encode(prompts), encode([w[len(p):] for w, p in zip(whole, prompts)])):
            ids = p.ids + r.ids
            if len(ids) > max_len and (long_rows == "drop" or len(p.ids) >= max_len - 1):
                n["dropped"] += 1
                continue
            n["cut"] += len(ids) > max_len
            seqs.append(torch.tensor(ids[:max_len], dtype=torch.int32))
            start.append(len(p.ids))
        if n["read"] % 16384 < len(chunk):
            run.log(f"data: {n['read']} rows read")
    run.log(f"data: {len(seqs)} rows kept, {n['cut']} of them cut to --max-len {max_len}; "
            f"{n['dropped']} dropped; {n['no_think']} had no think block and got an empty one")
    if len(seqs) < 2:
        fail(f"only {len(seqs)} usable rows; give more data or a larger --max-len")
    target = torch.cat([torch.arange(len(s)) >= p for s, p in zip(seqs, start)]).to(torch.uint8)
    perm = torch.randperm(len(seqs), generator=torch.Generator().manual_seed(42))
    n_held = max(1, len(seqs) // 100)
    return dict(ids=torch.cat(seqs), target=target,
                offsets=F.pad(torch.tensor([len(s) for s in seqs]).cumsum(0), (1, 0)),
                start=torch.tensor(start), train=perm[n_held:], held=perm[:n_held])

def prepare_data(run) -> dict:
    """out/data.safetensors, made by rank 0 (the other processes wait for it) unless resuming."""
    a, path = run.args, run.out / "data.safetensors"
    if run.rank == 0 and not (a.resume and path.exists()):
        if a.size == "toy":  # a word-level tokenizer: generate.py reads prompts like "A>C | 2: A"
            from tokenizers import Tokenizer, models, pre_tokenizers
            tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(TOY_VOCAB)}, "<unk>"))
            tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
            run.tokenizer_dir.mkdir(exist_ok=True)
            tok.save(str(run.tokenizer_dir / "tokenizer.json"))
            n = a.batch * (a.pretrain_steps + a.steps) + a.eval_samples
            data = toy_data(n, a.eval_samples, a.seed)
        else:
            tok = tah.load_tokenizer(run.tokenizer_dir)
            try:
                rows = read_jsonl(a.data) if a.data else openr1_rows(tok)
                data = chat_data(rows, tok, a.max_len, a.long_rows, run)
            except ValueError as e:
                fail(e)
        run.write(path.name, safetensors_bytes(data))
    run.barrier()
    data = load_file(path)
    data["train"] = data["train"][:a.samples] if a.samples else data["train"]
    data["held"] = data["held"][:a.eval_samples]
    return data

def spans(data: dict, rows) -> list[tuple[int, int]]:
    return [(int(data["offsets"][i]), int(data["offsets"][i + 1])) for i in rows.tolist()]

def make_batch(data: dict, rows, labels=None, device="cpu") -> dict:
    """Right-padded (B, T) tensors. At position t: tgt = the token t must predict (-100 if not
    scored), kind = that target's kind, passes = the oracle's passes for t (1 where unknown)."""
    sp = spans(data, rows)
    ids, kind, passes = (torch.zeros(len(sp), max(e - a for a, e in sp)).long() for _ in range(3))
    valid = torch.zeros_like(ids, dtype=torch.bool)
    for r, (a, e) in enumerate(sp):
        ids[r, :e - a], kind[r, :e - a], valid[r, :e - a] = data["ids"][a:e], data["target"][a:e], 1
        passes[r, :e - a] = labels[a:e] if labels is not None else 1
    kind = F.pad(kind[:, 1:], (0, 1))  # (B, T): a target's kind moves to its predicting position
    tgt = torch.where(kind > 0, F.pad(ids[:, 1:], (0, 1)), -100)
    b = dict(ids=ids, valid=valid, tgt=tgt, kind=kind, passes=passes.clamp(min=1),
             start=data["start"][rows])
    return {k: v.to(device) for k, v in b.items()}

def batch_indices(seed: int, step: int, n: int, batch: int) -> torch.Tensor:
    """Rows (0..n-1) of one optimizer step, a function of (seed, step) alone: resuming needs no
    loader state. Epoch e walks a permutation seeded by (seed, e)."""
    g = torch.arange(step * batch, (step + 1) * batch)  # global sample counter
    return torch.cat([torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + e))
                      [g[g // n == e] % n] for e in (g // n).unique().tolist()])


# ----------------------------------------------------------------------------- labels and losses

def oracle_labels(pred: torch.Tensor, ids: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
    """Passes (B, T): 2 at candidate positions t whose greedy guess pred[t] is not token t+1."""
    nxt = F.pad(ids[:, 1:], (0, 1), value=-1)  # the last position has no next token: never hard
    return 1 + (candidate & (pred != nxt) & (nxt >= 0)).long()

@torch.no_grad()
def compute_labels(run, reference, data: dict, rows) -> torch.Tensor:
    """Oracle passes (flat uint8, aligned with data["ids"]) for `rows`, from one greedy
    teacher-forced forward of the frozen reference() over the response tokens."""
    path, bs = run.out / "labels.safetensors", run.args.micro_batch
    if run.rank == 0 and not (run.args.resume and path.exists()):
        labels, ref = torch.ones(len(data["ids"]), dtype=torch.uint8), reference().eval()
        t0 = time.time()
        for i in range(0, len(rows), bs):
            b = make_batch(data, rows[i:i + bs], device=run.device)
            with run.amp():
                pred = argmax(ref, ref(b["ids"], "standard", valid=b["valid"], logits="none"))
            response = torch.arange(pred.shape[1], device=pred.device) >= b["start"][:, None]
            lab = oracle_labels(pred, b["ids"], (b["tgt"] >= 0) & response).cpu()
            for r, (a, e) in enumerate(spans(data, rows[i:i + bs])):
                labels[a:e] = lab[r, :e - a]
            if i // bs % 1000 == 999:
                run.log(f"labels: {i + bs}/{len(rows)} rows, "
                        f"ETA {(len(rows) - i) * (time.time() - t0) / (i + bs) / 60:.1f} min")
        run.write(path.name, safetensors_bytes(dict(labels=labels)))
        hard = int((labels == 2).sum())
        scored = sum(int((data["target"][a:e] > 0).sum()) for a, e in spans(data, rows))
        run.log(f"labels: {hard} of {scored} scored tokens are hard ({hard / scored:.1%})")
    run.barrier()
    return load_file(path)["labels"]

def rows_with_hard_tokens(run, data: dict, labels, rows) -> torch.Tensor:
    """`rows` less those without a hard token (the authors leave them out; --easy-rows keep)."""
    hard = torch.tensor([bool((labels[a:e] == 2).any()) for a, e in spans(data, rows)])
    keep = run.args.easy_rows == "keep"
    run.log(f"labels: {int((~hard).sum())} of {len(rows)} training rows have no hard token" +
            (", kept" if keep else ", left out of stages 1 and 2"))
    return rows if keep else rows[hard]

def chunked_ce(model, out: tah.Output, tgt: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy against tgt (B, T) of the final logits, made CE_CHUNK positions at a
    time from the passes' hidden states (in training again in backward): never a (T, V) tensor."""
    def ce(s: int) -> torch.Tensor:
        z = model.final_logits(out, s, s + CE_CHUNK).float()  # (B, chunk, V)
        return F.cross_entropy(z.flatten(0, 1), tgt[:, s:s + CE_CHUNK].flatten(), reduction="sum")
    run = partial(checkpoint, ce, use_reentrant=False) if out.passes[0].requires_grad else ce
    return sum(run(s) for s in range(0, tgt.shape[1], CE_CHUNK))

def argmax(model, out: tah.Output, depth: int | None = None) -> torch.Tensor:
    """The argmax (B, T) of the logits after `depth` passes (all by default), CE_CHUNK at a time."""
    return torch.cat([model.final_logits(out, s, s + CE_CHUNK, depth).argmax(-1)
                      for s in range(0, out.iter_count.shape[1], CE_CHUNK)], 1)

def lm_loss(model, b: dict, policy: str):
    """Next-token CE over the scored tokens under `policy` ("oracle" = the labels in b)."""
    out = model(b["ids"], b["passes"] if policy == "oracle" else policy, valid=b["valid"],
                logits="none")
    return chunked_ce(model, out, b["tgt"]), int((b["tgt"] >= 0).sum())

def decider_loss(model, b: dict, pos_weight: float):
    """BCE of the decider's pass-1 logit against the oracle labels, averaged over each row's real
    tokens (prompt positions negatives), summed over rows: train_step divides by the step's rows,
    so every row weighs the same, as in the authors' loss. Pass 2 never runs."""
    logit = model(b["ids"], "standard", valid=b["valid"], logits="none").continue_logit.float()
    bce = F.binary_cross_entropy_with_logits(logit, (b["passes"] > 1).float(), reduction="none",
                                             pos_weight=logit.new_tensor(pos_weight))
    return ((bce * b["valid"]).sum(1) / b["valid"].sum(1).clamp(min=1)).sum(), len(bce)


# ----------------------------------------------------------------------------- training

VOLATILE = {"resume", "log_every", "save_every", "threads", "device", "baseline", "argv"}

class Run:
    """The settings and --out, the device, the processes (under torchrun: rank 0 alone prepares
    data and labels, logs and writes) and every write, whole or not at all."""

    def __init__(self, args):
        self.args, self.out, self.stop, self.steps_done = args, Path(args.out), False, 0
        self.rank, self.world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        self.prepare_out()
        if args.threads:
            torch.set_num_threads(args.threads)
        self.tokenizer_dir = tah.resolve(args.model) if args.model else self.out / "tokenizer"
        self.device = torch.device(args.device or tah.default_device())
        if "RANK" in os.environ and not dist.is_initialized():  # torchrun: a process per GPU
            cuda = self.device.type == "cuda"  # else gloo: processes on a CPU
            self.device = torch.device(f"cuda:{os.environ['LOCAL_RANK']}" if cuda else "cpu")
            # a long timeout: the others wait while rank 0 makes the data
            dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(hours=12),
                                    device_id=self.device if cuda else None)
        self.amp = partial(torch.autocast, self.device.type, torch.bfloat16,
                           enabled=args.dtype == "bfloat16")  # run.amp(): a context

    def prepare_out(self) -> None:
        """--out made, or found holding a run of the same settings (the flags not in VOLATILE);
        settings.json written."""
        out, settings = self.out, self.out / "settings.json"
        keep = {k: v for k, v in vars(self.args).items() if k not in VOLATILE}
        if self.rank == 0 and out.exists() and (not out.is_dir() or any(out.iterdir()) and
                                                not settings.exists()):
            fail(f"--out {out} is not a train.py run; give a new or empty directory")
        old = json.loads(settings.read_text()) if settings.exists() else keep
        if self.args.resume and old != keep:
            fail(f"{out} holds a run with other settings "
                 f"({', '.join(k for k in keep if old.get(k) != keep[k])}); use another --out, "
                 "the same flags, or --no-resume to start over")
        try:
            out.mkdir(parents=True, exist_ok=True)
            self.write("settings.json", json.dumps(keep, indent=1).encode())  # by rank 0
        except OSError as e:
            fail(f"--out {out}: cannot write there ({e.strerror}); give a directory you can "
                 "write to")

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def sum(self, *values: float) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if dist.is_initialized():  # summed over the processes
            dist.all_reduce(t)
        return t.tolist()

    def log(self, msg: str) -> None:
        if self.rank == 0:
            print(msg, flush=True)
            with open(self.out / "train.log", "a") as f:
                f.write(msg + "\n")

    def write(self, name: str, obj) -> None:
        """out/name, whole or not at all: *.pt by torch.save, else `obj` as bytes (tensors by
        safetensors_bytes: save_file would make owner-only files)."""
        if self.rank == 0:
            tmp = self.out / f".{name}.tmp"
            if name.endswith(".pt"):
                torch.save(obj, tmp)
            else:
                tmp.write_bytes(obj)
            os.replace(tmp, self.out / name)

def load_model(run, path, parts: tah.TaHConfig | None = None):
    """A checkpoint in fp32 (bf16 comes from autocast), with the fresh TaH parts `parts` asks."""
    try:
        model = tah.load(path, device=run.device, dtype=torch.float32)
    except (OSError, ValueError) as e:
        fail(f"{e}; check --model and --reference, or start over in a new --out")
    return model if parts is None else tah.add_parts(model, parts)

def tah_parts(a, decider: bool) -> tah.TaHConfig:
    return tah.TaHConfig(input_topk=a.input_topk, lora_r=a.lora_r, lora_alpha=a.lora_alpha,
                         lora_dropout=a.lora_dropout, decider_topk=a.decider_topk,
                         decider_layers=a.decider_layers if decider else None,
                         decider_dims=a.decider_dims, threshold=a.threshold)

def train_step(run, model, opt, batches: list[dict], loss_fn, seed: int) -> tuple[float, float]:
    """One optimizer step over this process's micro-batches: gradients summed over them and the
    processes, divided by the count (tokens or rows) of the whole step, clipped by their global
    norm. Returns the loss and the norm before clipping; a non-finite one skips the update."""
    total, count = 0.0, 0
    for i, b in enumerate(batches):  # dropout masks from (step, micro-batch): any process count
        torch.manual_seed(hash((seed, run.rank * len(batches) + i)))
        with run.amp():
            loss, n = loss_fn(model, b)
        loss.backward()
        total, count = total + loss.item(), count + n
    total, count = run.sum(total, count)
    params = [p for g in opt.param_groups for p in g["params"]]
    for p in params:
        if p.grad is None:  # unused in this step (LoRA, if no token was hard)
            p.grad = torch.zeros_like(p)
        if run.world > 1:  # data-parallel: summed over the processes (what DDP does, in buckets)
            dist.all_reduce(p.grad)
        p.grad.div_(max(count, 1))
    norm = float(torch.nn.utils.clip_grad_norm_(params, run.args.clip))
    if math.isfinite(total) and math.isfinite(norm):
        opt.step()
    opt.zero_grad(set_to_none=True)
    return total / max(count, 1), norm

def train_stage(run, name: str, make, loss_fn, steps: int, lr: float, data: dict, rows,
                labels=None):
    """out/name if that stage finished before; else make()'s parameters that require grad, trained
    `steps` optimizer steps on `rows`, saved as out/name. Resumes from out/name.state.pt."""
    a, state_path = run.args, run.out / f"{name}.state.pt"
    if a.resume and (run.out / name).exists():
        run.log(f"{name}: finished before, loading {run.out / name}")
        return load_model(run, run.out / name)
    torch.manual_seed(a.seed)  # the same initialisation (LoRA, decider) whether fresh or resumed
    model = make()
    model.grad_checkpointing = a.size != "toy" and model.decider is None  # not for a decider
    # weight decay, as the authors' trainer: on every weight but biases and LayerNorms
    norms = {id(p) for m in model.modules() if isinstance(m, torch.nn.LayerNorm)
             for p in m.parameters()}
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    exempt = [n.endswith("bias") or "layernorm" in n or id(p) in norms for n, p in trained]
    opt = torch.optim.AdamW([{"params": [p for (_, p), e in zip(trained, exempt) if not e]},
                             {"params": [p for (_, p), e in zip(trained, exempt) if e],
                              "weight_decay": 0.0}], lr=lr, weight_decay=a.weight_decay)
    start = 0
    if a.resume and state_path.exists():  # whole tensors by name: any number of processes
        s = torch.load(state_path, map_location=run.device, weights_only=True)
        if set(s["params"]) != {n for n, _ in trained}:
            fail(f"{state_path} does not belong to this stage; delete it to start the stage over")
        model.load_state_dict(s["params"], strict=False)  # the trained parameters, all of them
        opt.load_state_dict(s["optim"])
        start = int(s["step"])
        run.log(f"{name}: resuming at step {start}/{steps}")
    run.barrier()  # every process has read out/name and the state before rank 0 may write them
    old = signal.signal(signal.SIGINT, lambda *_: setattr(run, "stop", True))  # between steps
    t0, tokens, clipped, warm = time.time(), 0, 0, max(1, round(a.warmup * steps))
    stop_after = int(os.environ.get("TRAIN_STOP_AFTER", 0))  # for tests: Ctrl-C after n steps
    try:
        for step in range(start, steps):
            idx = rows[batch_indices(a.seed, step, len(rows), a.batch)].tensor_split(run.world)
            batches = [make_batch(data, idx[run.rank][i:i + a.micro_batch], labels, run.device)
                       for i in range(0, len(idx[run.rank]), a.micro_batch)]  # this process's
            cosine = 0.55 + 0.45 * math.cos(math.pi * (step - warm) / max(1, steps - 1 - warm))
            for g in opt.param_groups:  # linear warm-up, then a cosine from lr down to 0.1 lr
                g["lr"] = lr * ((step + 1) / warm if step < warm else cosine)
            loss, norm = train_step(run, model.train(), opt, batches, loss_fn, hash((a.seed, step)))
            if not math.isfinite(loss):
                run.log(f"{name}: loss is {loss} at step {step + 1}; stopping. Lower --lr or "
                        f"--clip, or use --dtype float32, then rerun to resume from {state_path}")
                sys.exit(1)
            run.steps_done, clipped = run.steps_done + 1, clipped + (norm > a.clip)
            stop, n = run.sum(run.stop or 0 < stop_after <= run.steps_done,  # Ctrl-C stops all
                              sum(int(b["valid"].sum()) for b in batches))
            tokens += n
            if step % a.log_every == 0 or step == steps - 1:
                dt = time.time() - t0
                run.log(f"{name} step {step + 1}/{steps} loss {loss:.4f} grad norm {norm:.3f} lr "
                        f"{opt.param_groups[0]['lr']:.2e} {tokens / dt:.0f} tok/s ETA "
                        f"{(steps - step - 1) * dt / (step + 1 - start) / 60:.1f} min")
            if stop or (a.save_every and (step + 1) % a.save_every == 0):
                run.write(state_path.name, dict(step=step + 1, optim=opt.state_dict(),
                                                params={n: p.detach() for n, p in trained}))
            if stop:
                run.log(f"{name}: interrupted after step {step + 1}, state saved: rerun to resume")
                sys.exit(130)
    except torch.OutOfMemoryError:  # the state saved last (every --save-every steps) resumes
        fail(f"{name}: out of GPU memory in step {step + 1}; see the README's memory table, lower "
             "--max-len or use --micro-batch 1, then rerun to resume from the last saved state")
    finally:
        signal.signal(signal.SIGINT, old)
    run.log(f"{name}: clipped (gradient norm over --clip {a.clip}) in {clipped} of "
            f"{steps - start} steps")
    if run.rank == 0:
        tah.save(model, run.out / name, tokenizer_dir=run.tokenizer_dir)
    run.barrier()
    state_path.unlink(missing_ok=True)
    return model.eval()

def stage1(run, base, data: dict, labels, rows, steps: int):
    """The backbone and a fresh LoRA, trained under the oracle labels."""
    parts = tah_parts(run.args, decider=False)
    return train_stage(run, "stage1", make=lambda: load_model(run, base, parts),
                       loss_fn=partial(lm_loss, policy="oracle"), steps=steps, lr=run.args.lr,
                       data=data, rows=rows, labels=labels)

def stage2(run, data: dict, labels, rows, steps: int):
    """Stage 1's model with a fresh decider, the only part that trains, by BCE on the labels."""
    a = run.args
    read = spans(data, rows[torch.cat([batch_indices(a.seed, s, len(rows), a.batch)
                                       for s in range(steps)])])
    hard = sum(int((labels[s:e] == 2).sum()) for s, e in read)
    pos_weight = a.pos_weight or (sum(e - s for s, e in read) - hard) / max(hard, 1)
    run.log(f"stage 2: decider BCE with pos_weight {pos_weight:.2f}")

    def decider_only():
        model = load_model(run, run.out / "stage1", tah_parts(a, True)).requires_grad_(False)
        model.decider.requires_grad_(True)  # the only part that trains
        return model
    model = train_stage(run, "tah", make=decider_only, loss_fn=partial(decider_loss,
                        pos_weight=pos_weight), steps=steps, lr=a.decider_lr, data=data, rows=rows,
                        labels=labels)
    state, before = model.state_dict(), tah.load(run.out / "stage1").state_dict()
    if any(not torch.equal(v, state[k].cpu()) for k, v in before.items()):
        raise RuntimeError("stage 2 changed the backbone or the LoRA; only the decider may train")
    run.log("stage 2: backbone and LoRA bitwise unchanged")
    return model

def baseline(run, name: str, base, data: dict, rows, steps: int):
    """On the same rows and budget: "always" (every token iterates, with a fresh LoRA), or else a
    Standard model (no iteration, no LoRA)."""
    policy = "always" if name == "always" else "standard"
    parts = tah_parts(run.args, decider=False) if policy == "always" else None
    return train_stage(run, name, make=lambda: load_model(run, base, parts), steps=steps,
                       loss_fn=partial(lm_loss, policy=policy), lr=run.args.lr, data=data,
                       rows=rows)

@torch.no_grad()
def prune_choice(model, batches: list[dict], amp) -> tuple[int, float, list[float]]:
    """The mean over batches of the loss per token, of the model and of the model without each
    decoder layer in turn; returns the layer whose removal raises it least (model given back)."""
    layers, L = model.model.layers, model.config.num_hidden_layers

    def loss():  # the mean over the batches of each one's loss per token
        with amp():
            per_batch = [lm_loss(model, b, "standard") for b in batches]
        return sum(s.item() / max(n, 1) for s, n in per_batch) / len(per_batch)
    base, losses = loss(), []
    try:
        for i in range(L):
            model.model.layers = torch.nn.ModuleList(m for j, m in enumerate(layers) if j != i)
            model.config.num_hidden_layers = L - 1
            losses.append(loss())
    finally:
        model.model.layers, model.config.num_hidden_layers = layers, L
    return min(range(L), key=losses.__getitem__), base, losses

def prune(run, base, data: dict) -> Path:
    """"TaH" (equal parameters): out/pruned, `base` without the layer whose removal raises least the
    loss on PRUNE_ROWS held-out rows (whole text, prompt included, cut at PRUNE_LEN tokens)."""
    a, path = run.args, run.out / "pruned"
    if run.rank == 0 and not (a.resume and path.exists()):
        model, batches = load_model(run, base).eval(), []
        for i in range(0, min(PRUNE_ROWS, len(data["held"])), a.micro_batch):
            b = make_batch(data, data["held"][i:i + a.micro_batch], device=run.device)
            ids, valid = b["ids"][:, :PRUNE_LEN], b["valid"][:, :PRUNE_LEN]
            tgt = F.pad(ids[:, 1:].masked_fill(~valid[:, 1:], -100), (0, 1), value=-100)
            batches.append(dict(ids=ids, valid=valid, tgt=tgt))
        layer, loss, losses = prune_choice(model, batches, run.amp)
        run.log(f"prune: held-out loss {loss:.4f}; without layer " +
                ", ".join(f"{i}: {x:.4f}" for i, x in enumerate(losses)) + f"; removing {layer}")
        del model.model.layers[layer]  # the ModuleList numbers the rest 0..L-2, as a checkpoint
        model.config.num_hidden_layers -= 1
        run.write("prune.json", json.dumps(dict(removed=layer, loss=loss,
                                                loss_without=losses)).encode())
        tah.save(model, path, tokenizer_dir=run.tokenizer_dir)
    run.barrier()  # the other processes read out/pruned
    return path


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(run, model, data: dict, labels, policy: str) -> dict:
    """Over the held-out scored predictions: loss, accuracy, share iterating (iterating_all: of all
    tokens), accuracy per kind (toy: easy 1-hop, hard 2-hop), answers pass 2 fixed and broke."""
    s, held, bs = torch.zeros(14, dtype=torch.float64), data["held"], run.args.micro_batch
    for i in range(run.rank * bs, len(held), run.world * bs):  # this process's micro-batches
        b = make_batch(data, held[i:i + bs], labels, run.device)
        with run.amp():  # pass 1's argmax from the same forward: pass 1 never reads pass 2
            out = model(b["ids"], b["passes"] if policy == "oracle" else policy,
                        valid=b["valid"], threshold=run.args.threshold, logits="none")
            ok, ok1 = (argmax(model, out, depth) == b["tgt"] for depth in (None, 1))
            loss = chunked_ce(model, out, b["tgt"])
        scored, it = b["tgt"] >= 0, out.iter_count > 1
        counts = [loss, ok.sum(), scored.sum(), (it & scored).sum(),
                  (it & b["valid"]).sum(), b["valid"].sum()] + \
            [x[b["kind"] == k].sum() for k in (1, 2) for x in (ok, scored, ok & ~ok1, ok1 & ~ok)]
        s += torch.tensor([float(c) for c in counts], dtype=torch.float64)
    loss, right, n, it, it_all, valid, *k = run.sum(*s.tolist())
    r = dict(loss=loss / n, acc=right / n, iterating=it / n, iterating_all=it_all / valid,
             fixed=int(k[2] + k[6]), broken=int(k[3] + k[7]))
    if k[5]:  # two kinds of targets: the toy's 1-hop and 2-hop answers
        r |= dict(acc_easy=k[0] / k[1], acc_hard=k[4] / k[5], fixed_easy=int(k[2]),
                  broken_easy=int(k[3]), fixed_hard=int(k[6]), broken_hard=int(k[7]))
    return {key: v if isinstance(v, int) else round(v, 4) for key, v in r.items()}

def report(run, models: dict, data: dict, labels) -> dict:
    """Evaluates each model under its policies on the held-out rows (kept in eval.json); prints
    the table (iter%: scored predictions iterating, all%: all tokens), what pass 2 fixed, broke."""
    path, toy = run.out / "eval.json", run.args.size == "toy"
    res = json.loads(path.read_text()) if run.args.resume and path.exists() else {}
    for name, (model, policies) in models.items():
        for p in [p for p in policies if p not in res.get(name, {})]:
            run.log(f"evaluating {name} with policy {p} on {len(data['held'])} held-out rows")
            res.setdefault(name, {})[p] = evaluate(run, model.eval(), data, labels, p)
            run.write("eval.json", json.dumps(res, indent=2).encode())
    rows = [(name, p, r) for name, per in res.items() for p, r in per.items()]
    run.log(f"\nmodel          policy       loss    acc  iter%   all%" + ("  1-hop  2-hop" * toy))
    for name, p, r in rows:
        run.log(f"{name:14} {p:9} {r['loss']:7.4f} {r['acc']:6.3f} {100 * r['iterating']:6.1f} "
                f"{100 * r['iterating_all']:6.1f}" + (f" {r.get('acc_easy', 0):6.3f} "
                                                      f"{r.get('acc_hard', 0):6.3f}" * toy))
    keys = ["fixed_easy", "broken_easy", "fixed_hard", "broken_hard"] if toy else \
        ["fixed", "broken"]
    run.log("\npass 2 against pass 1 on the held-out answers: fixed = pass 1 wrong and final "
            "right, broken = pass 1 right and final wrong\nmodel          policy   " +
            (" fixed 1-hop broken 1-hop  fixed 2-hop broken 2-hop" if toy else " fixed broken"))
    for name, p, r in [x for x in rows if x[1] != "standard"]:
        run.log(f"{name:14} {p:9}" + "".join(f"{r.get(k, 0):{12 if toy else 6}d}" for k in keys))
    return res

def closing_words(run, res: dict, data: dict) -> None:
    """Two lines of verdict under the table, and the command that tries the trained model."""
    toy = run.args.size == "toy"
    key, what = ("acc_hard", "2-hop answers") if toy else ("acc", "held-out response tokens")
    d, forced = res["tah"]["decider"], res["tah"]["always"]
    others = [f"{label} {res[m][p][key]:.1%}" for label, m, p in [
        ("Standard trained as long", "standard-long" if toy else "standard", "standard"),
        ("AlwaysThink (every token iterating)", "always", "always")] if p in res.get(m, {})]
    run.log(f"\nTaH with its decider gets {d[key]:.1%} of the {what} right, iterating on "
            f"{d['iterating_all']:.1%} of all tokens" + "".join(f"; {o}" for o in others) + ".")
    run.log(f"Forced to iterate every token, TaH's pass 2 breaks {forced['broken']} answers that "
            f"pass 1 had right; its decider breaks {d['broken']} and fixes {d['fixed']}.")
    prompt, flags, answer = "What is 17 * 24?", "", ""
    if toy:  # the table and the first 2-hop query of a held-out row
        a, e = spans(data, data["held"][:1])[0]
        p = a + int(torch.nonzero(data["target"][a:e] == 2)[0])
        ids = data["ids"][a:a + N_LETTERS + 1].tolist() + data["ids"][p - 2:p].tolist()
        prompt, flags = " ".join(TOY_VOCAB[t] for t in ids), "--greedy --max-new-tokens 1 "
        answer = f"   (the answer: {TOY_VOCAB[int(data['ids'][p])]})"
    model = shlex.quote(str(run.out / "tah"))
    run.log(f"Try it: python generate.py --model {model} {flags}{shlex.quote(prompt)}{answer}")
    run.log(f"Score it: python bench/eval.py --model {model} {flags}" +
            ("tests/fixtures/toy-eval.jsonl" if toy else "paper"))


# ----------------------------------------------------------------------------- the recipe

def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    run = Run(a)
    run.log(f"\n$ python train.py {' '.join(a.argv)}  (device {run.device}, processes {run.world})")
    data = prepare_data(run)
    if a.size == "toy":  # Standard first: the baseline, the oracle's reference, stage 1's start
        pretrain_rows, rows = data["train"].tensor_split([a.batch * a.pretrain_steps])
        standard = train_stage(run, "standard", make=lambda: tah.TaH(TOY_CONFIG).to(run.device),
                               loss_fn=partial(lm_loss, policy="standard"),
                               steps=a.pretrain_steps, lr=a.lr, data=data, rows=pretrain_rows)
        base, reference = run.out / "standard", lambda: standard
    else:
        rows, base, reference = data["train"], a.model, partial(load_model, run, a.reference)
    steps = a.steps or math.ceil(len(rows) * a.epochs / a.batch)
    if a.baseline:
        model = baseline(run, a.baseline, base=base, data=data, rows=rows, steps=steps)
        return report(run, {a.baseline: (model, [a.baseline])}, data=data, labels=None)
    labels = compute_labels(run, reference=reference, data=data,
                            rows=torch.cat([rows, data["held"]]))
    if a.prune:
        base = prune(run, base=base, data=data)
    hard_rows = rows_with_hard_tokens(run, data=data, labels=labels, rows=rows)
    steps = a.steps or math.ceil(len(hard_rows) * a.epochs / a.batch)
    decider_steps = a.decider_steps or math.ceil(len(hard_rows) * a.decider_epochs / a.batch)
    stage1(run, base=base, data=data, labels=labels, rows=hard_rows, steps=steps)
    model = stage2(run, data=data, labels=labels, rows=hard_rows, steps=decider_steps)
    models = {}
    if a.size == "toy":  # as many more steps without iterating; and every token iterating
        longer = baseline(run, "standard-long", base=base, data=data, rows=rows, steps=steps)
        always = baseline(run, "always", base=base, data=data, rows=rows, steps=steps)
        models = {"standard": (standard, ["standard"]), "standard-long": (longer, ["standard"]),
                  "always": (always, ["always"])}
    res = report(run, models | {"tah": (model, POLICIES)}, data=data, labels=labels)
    closing_words(run, res, data=data)
    return res

def number(cast, test, need: str):
    """A type= for argparse: the flag's text as `cast` (int or float), refused unless it is finite
    and test(value) holds; argparse then stops with `argument --lr: -1 is not a number > 0`."""
    def parse(text: str):
        value = cast(text)
        if not (math.isfinite(value) and test(value)):
            raise argparse.ArgumentTypeError(f"{text} is not {need}")
        return value
    parse.__name__ = cast.__name__  # what argparse names for text that is no number at all
    return parse

POS_INT = number(int, lambda v: v > 0, "a whole number > 0")
COUNT = number(int, lambda v: v >= 0, "a whole number >= 0")
POSITIVE = number(float, lambda v: v > 0, "a number > 0")
NON_NEG = number(float, lambda v: v >= 0, "a number >= 0")
PROB = number(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")
FRACTION = number(float, lambda v: 0 <= v < 1, "a number in [0, 1)")

class Help(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # the default after each help, unless None or False
        hide = action.default is None or action.default is False
        return action.help if hide else super()._get_help_string(action)

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=Help, add_help=False)
    p.error = lambda msg: fail(f"{msg}; see python train.py --help")
    add = p.add_argument
    add("--size", choices=list(SIZES), default="toy", help="toy (CPU), 0.6b (24 GB GPU), 1.7b")
    size = p.parse_known_args(argv)[0].size  # a first look: its presets are the defaults below
    add("-h", "--help", action="help", help="show this help message and exit")
    add("--model", default="Qwen/Qwen3-0.6B-Base", help="backbone to train: hub id or directory")
    add("--reference", default="Qwen/Qwen3-0.6B", help="frozen model whose greedy misses are hard")
    add("--data", help="JSONL of {question, generation} or {messages} lines (default OpenR1-Math)")
    add("--out", help="directory every stage writes to")
    add("--max-len", type=POS_INT, default=8192, help="tokens a row may have (see --long-rows)")
    add("--long-rows", choices=["truncate", "drop"], default="truncate", help="rows over --max-len")
    add("--easy-rows", choices=["drop", "keep"], default="drop", help="rows with no hard token")
    add("--samples", type=COUNT, default=12800, help="train on this many rows (0 = all ~94k)")
    add("--epochs", type=POSITIVE, default=1, help="stage-1 epochs over --samples (authors 5)")
    add("--decider-epochs", type=POSITIVE, default=2, help="stage-2 epochs")
    add("--pretrain-steps", type=COUNT, default=0, help="toy: steps of Standard, from scratch")
    add("--steps", type=COUNT, default=0, help="stage-1 and baseline steps (0: from --epochs)")
    add("--decider-steps", type=COUNT, default=0, help="stage-2 steps (0: from --decider-epochs)")
    add("--batch", type=POS_INT, default=128, help="rows per optimizer step")
    add("--micro-batch", type=POS_INT, default=1, help="rows per forward; a step sums the rest")
    add("--lr", type=POSITIVE, default=4e-5, help="peak learning rate of stage 1 and the baselines")
    add("--decider-lr", type=POSITIVE, default=3e-5, help="peak learning rate of stage 2")
    add("--warmup", type=FRACTION, default=0.03, help="warm-up share of steps, then cosine to 0.1")
    add("--weight-decay", type=NON_NEG, default=0.01, help="AdamW's, not on biases and LayerNorms")
    add("--clip", type=POSITIVE, default=0.2, help="gradient-norm clipping")
    add("--lora-r", type=POS_INT, default=16, help="rank of the LoRA that pass 2 adds")
    add("--lora-alpha", type=POSITIVE, default=32, help="its output is scaled by alpha / r")
    add("--lora-dropout", type=FRACTION, default=0.1, help="dropout on its input, in training")
    add("--input-topk", type=POS_INT, default=100, help="top-k logits mixed into the soft token")
    add("--decider-layers", type=int, nargs="+", default=[0, 7, 13, 20, 26], help="hidden states "
        "the decider reads (0 = embeddings, k = layer k's output, L = the final norm's)")
    add("--decider-dims", type=POS_INT, nargs="+", default=[256] * 6, help="its blocks' widths")
    add("--decider-topk", type=POS_INT, default=100, help="top-k logit values the decider reads")
    add("--pos-weight", type=NON_NEG, default=4.8, help="BCE weight of hard tokens (0: neg/pos)")
    add("--threshold", type=PROB, default=0.9, help="decider threshold: evaluation, saved model")
    add("--prune", action="store_true", help='"TaH": first remove the layer that matters least')
    add("--baseline", nargs="?", const="standard", choices=["standard", "always"],
        help="train a baseline instead: Standard (no iteration) or AlwaysThink (every token)")
    add("--eval-samples", type=POS_INT, default=200, help="held-out rows to evaluate on")
    add("--seed", type=int, default=0, help="seed of the initialisation, data order and toy data")
    add("--device", help="cuda, mps or cpu (default: the first available)")
    add("--dtype", choices=["float32", "bfloat16"], help="autocast dtype (default: bfloat16 on a "
        "GPU for 0.6b/1.7b, else float32)")
    add("--threads", type=COUNT, default=0, help="CPU threads for PyTorch (0 = its default)")
    add("--log-every", type=POS_INT, default=1, help="log progress every this many steps")
    add("--save-every", type=COUNT, default=10, help="steps between saved states (0: Ctrl-C only)")
    add("--resume", action=argparse.BooleanOptionalAction, default=True,
        help="skip finished stages, resume an interrupted one (--no-resume: start over)")
    p.set_defaults(size=size, out=f"runs/{size}", **SIZES[size])
    a = p.parse_args(argv)
    a.argv = sys.argv[1:] if argv is None else list(argv)
    check_args(a)
    return a

def check_args(a) -> None:
    """What argparse cannot see: the device, the data file and the models, before anything loads
    or is written."""
    try:
        device = torch.device(a.device or tah.default_device())
    except RuntimeError:
        fail(f"--device {a.device}: not a device; use cuda, cuda:N, mps or cpu")
    if not dict(cpu=True, mps=torch.backends.mps.is_available(), cuda=torch.cuda.is_available()
                and (device.index or 0) < torch.cuda.device_count()).get(device.type):
        fail(f"--device {a.device}: not on this machine; leave --device out to use "
             f"{tah.default_device()}")
    if a.baseline and a.size == "toy":
        fail("--baseline: the toy trains its baselines anyway; leave --baseline out")
    if a.data and not Path(a.data).is_file():
        fail(f"--data {a.data}: no such file; give a JSONL file, or leave --data out")
    layers = TOY_CONFIG.num_hidden_layers
    for flag in ["model", "reference"][:0 if a.size == "toy" else 1 if a.baseline else 2]:
        try:
            d = tah.resolve(getattr(a, flag))
            with tah.reading(d / "config.json"):
                config = tah.qwen3_config(tah.read_json(d / "config.json"))
            tok = tah.load_tokenizer(d) if flag == "model" else None
        except (OSError, ValueError) as e:
            fail(f"--{flag} {getattr(a, flag)}: not a Qwen3 checkpoint ({type(e).__name__}: {e}); "
                 "give a hub id or a directory with config.json, *.safetensors, tokenizer.json")
        layers = config.num_hidden_layers if flag == "model" else layers
        if tok and not tok.has_chat:
            fail(f"--model {a.model}: its tokenizer has no <|im_start|>/<|im_end|> tokens, and the "
                 "data is written in Qwen3's chat format; use a Qwen3 tokenizer")
    if not all(0 <= i <= layers - a.prune for i in a.decider_layers):
        fail(f"--decider-layers {a.decider_layers}: indices must lie in 0..{layers - a.prune}")
    a.dtype = a.dtype or ("bfloat16" if a.size != "toy" and device.type == "cuda" else "float32")

if __name__ == "__main__":
    try:
        main()
        if dist.is_initialized():  # every process ends together: gloo aborts one left alone
            dist.barrier()
    except KeyboardInterrupt:  # outside a training loop (data, labels, evaluation)
        sys.exit("interrupted: finished stages are kept; rerun the same command to go on")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
