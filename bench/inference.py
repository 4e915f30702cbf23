"""What generating costs, measured on a CPU with random Qwen3s in fp32 (nothing downloads):

  decode   tah.generate against transformers' generate on the same weights (saved by
           transformers, read by tah.load), greedy, prefill included: tokens/s by the wall clock
           and per CPU-second, the ratio ours/theirs (target >= 1.0), whether the tokens agree
  cost     TaH's forward and its cached decoding with a share p of the tokens iterating, against
           the standard forward (nobody iterates); pass 2 runs only on the iterating tokens, so
           the targets are forward time <= (1 + p) x 1.15 and decode tokens/s >= 0.95 / (1 + p)
  batch    batched generation (bench/eval.py --batch-size): tokens/s at each batch size, and
           with every row but the first stopping at its first token (the stop ids: those tokens,
           less any the first row makes); finished rows leave the batch, so that run should cost
           about what the first row costs alone
  prefill  the peak resident memory of a long prefill (tah.generate, one token), less what this
           process held before the model was built, against the weights plus the KV cache of
           every depth (target <= 1.2x); full (T, V) logits alone would be T x V x 4 bytes

    python bench/inference.py decode        # Qwen3-0.6B's shape cut to 2 layers, 512 + 128 tokens
    python bench/inference.py decode --shape mid --prompt-len 16 --new-tokens 256
    python bench/inference.py cost --clock cpu --repeats 3     # the README's and chapter 9's table
    python bench/inference.py cost --shape tiny --prompt-len 64 --new-tokens 8  # checks it runs
    python bench/inference.py batch         # batches 1, 4, 16; 32 new tokens; 64-token prompts
    python bench/inference.py prefill --prompt-len 1024 --layers 4

Shapes: 0.6b is Qwen3-0.6B's (hidden 1024, 16/8 heads, head_dim 128, intermediate 3072, vocab
151936, tied embeddings) cut to 2 layers; mid: hidden 512, 8 layers, 8/4 heads of 64,
intermediate 1536, vocab 32000; tiny: hidden 128, 2 layers, vocab 1000. Timed runs interleave
the sides in every repeat (a slow moment of a shared machine hits both) and medians or bests
are compared; --clock cpu (this process's CPU time, with 1 thread) is steadier than the wall.
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tah  # noqa: E402
from bench.common import Memory, decode_seconds, decode_vs_transformers, forced_passes, \
    spread  # noqa: E402

SHAPES = {
    "0.6b": dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=2,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128),
    "mid": dict(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                num_attention_heads=8, num_key_value_heads=4, head_dim=64),
    "tiny": dict(vocab_size=1000, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=1, head_dim=64),
}
# per command: what it measures, its shape, prompt length, new tokens and repeats by default
COMMANDS = dict(decode=("tah.generate against transformers' generate", "0.6b", 512, 128, 3),
                cost=("TaH's forward and decoding at an iterating share p", "mid", 512, 64, 5),
                batch=("batched generation's tokens/s", "mid", 64, 32, 3),
                prefill=("a long prefill's peak memory", "0.6b", 4096, 0, 0))

def shape(a) -> dict:
    return SHAPES[a.shape] | ({"num_hidden_layers": a.layers} if a.layers else {})

def tah_model(a) -> tah.TaH:
    """A random TaH with a live LoRA (its B not zero, as after training) and no decider; seed 0."""
    torch.manual_seed(0)
    model = tah.TaH(tah.Qwen3Config(**shape(a), torch_dtype="float32"),
                    tah.TaHConfig(lora_r=16, lora_alpha=32, lora_dropout=0.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(std=0.02)
    return model.eval()

def decode(a, clock) -> None:
    from transformers import Qwen3Config, Qwen3ForCausalLM  # a test dependency
    torch.manual_seed(a.seed)
    hf = spread(Qwen3ForCausalLM(Qwen3Config(
        **shape(a), tie_word_embeddings=True, max_position_embeddings=4096, bos_token_id=None,
        eos_token_id=None, pad_token_id=None)).float().eval())
    with tempfile.TemporaryDirectory() as d:  # ours reads what transformers wrote
        hf.save_pretrained(d)
        ours = tah.load(d, dtype=torch.float32)
    g = torch.Generator().manual_seed(a.seed)
    prompt = torch.randint(0, ours.config.vocab_size, (1, a.prompt_len), generator=g)
    n = a.new_tokens
    r = decode_vs_transformers(ours, hf, prompt, n, repeats=a.repeats, log=print)
    for side in ("tah", "hf"):  # the best of the repeats: the least disturbed run
        print(f"{side:5s}: {n / min(r[side]['wall']):7.1f} tokens/s wall, "
              f"{n / min(r[side]['cpu']):7.1f} tokens per CPU-second")
    wall, cpu = ({k: r[k][c] for k in ("tah", "hf")} for c in ("wall", "cpu"))
    print(f"ratio ours/HF: {min(cpu['hf']) / min(cpu['tah']):.2f}x by CPU time (medians "
          f"{statistics.median(cpu['hf']) / statistics.median(cpu['tah']):.2f}x), "
          f"{min(wall['hf']) / min(wall['tah']):.2f}x by wall time; target >= 1.0x")
    print(f"greedy tokens identical: {torch.equal(*r['tokens'])}")

def cost(a, clock) -> None:
    model, T, steps = tah_model(a), a.prompt_len, a.new_tokens
    c = model.config
    print(f"model: hidden {c.hidden_size}, {c.num_hidden_layers} layers, vocab {c.vocab_size}, "
          f"LoRA r 16; T = {T}, {steps} decode steps, {a.threads} thread(s), fp32 CPU, "
          f"{a.clock} clock")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (1, T), generator=g)
    names = ["standard"] + [f"p={p:g}" for p in a.fractions]
    fwd_passes = ["standard"] + [forced_passes((1, T), p, 2) for p in a.fractions]
    dec_passes = ["standard"] + [forced_passes((1, steps), p, 3) for p in a.fractions]

    @torch.no_grad()
    def forward(passes) -> float:
        t0 = clock()
        model(ids, passes)
        return clock() - t0
    forward(fwd_passes[-1])  # warm up
    decode_seconds(model, ids[:, :16], 4, dec_passes[-1][:, :4], clock)
    fwd, dec = ({n: [] for n in names} for _ in range(2))
    for r in range(a.repeats):
        for n, fp, dp in zip(names, fwd_passes, dec_passes):  # interleaved
            fwd[n].append(forward(fp))
            dec[n].append(decode_seconds(model, ids, steps, dp, clock))
        print(f"repeat {r + 1}/{a.repeats} done", flush=True)
    f0, d0 = statistics.median(fwd["standard"]), statistics.median(dec["standard"])
    ok = True
    for title, unit, table in ((f"forward, T = {T}: standard {f0 * 1e3:.1f} ms", "ms", fwd),
                               (f"decode after a {T}-token prompt: standard {steps / d0:.1f} "
                                "tokens/s", "tok/s", dec)):
        print(f"\n{title}\n{'':10}{unit:>9}{'ratio':>8}{'target':>11}")
        for n, p in zip(names[1:], a.fractions):
            t = statistics.median(table[n])
            if table is fwd:
                value, ratio, target = t * 1e3, t / f0, (1 + p) * 1.15
                met = ratio <= target
            else:
                value, ratio, target = steps / t, d0 / t, 0.95 / (1 + p)
                met = ratio >= target
            ok &= met
            print(f"{n:10}{value:9.1f}{ratio:8.3f}{'<=' if table is fwd else '>='}{target:9.3f}  "
                  f"{'ok' if met else 'MISSED'}")
    print("\nall targets met" if ok else "\nsome targets MISSED")

def batch(a, clock) -> None:
    model, n = tah_model(a), a.new_tokens
    cases, stops = {}, {}
    for b in a.batches:  # prompts of lengths T/2..T, left-padded
        g = torch.Generator().manual_seed(b)
        ids = torch.randint(0, model.config.vocab_size, (b, a.prompt_len), generator=g)
        lengths = torch.randint(a.prompt_len // 2, a.prompt_len + 1, (b,), generator=g)
        cases[b] = ids, torch.arange(a.prompt_len)[None] >= a.prompt_len - lengths[:, None]
        toks = torch.stack([t for t, _ in tah.generate(model, ids, n, valid=cases[b][1])], 1)
        stops[b] = sorted(set(toks[1:, 0].tolist()) - set(toks[0].tolist()))

    def run(ids, valid, stop_ids) -> tuple[float, int]:  # seconds, tokens made before each stop
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
    config, T, memory = tah.Qwen3Config(**shape(a), torch_dtype="float32"), a.prompt_len, \
        Memory(torch.device("cpu"))
    torch.manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (1, T))
    before = memory.now()
    with torch.device("meta"):
        model = tah.TaH(config)
    model = model.to_empty(device="cpu").eval()  # no init temporaries; to_empty unties the head
    model.lm_head.weight = model.model.embed_tokens.weight
    with torch.no_grad():
        for weight in model.parameters():
            weight.normal_(0.0, 0.02)
    del weight
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    L, depths = config.num_hidden_layers, model.tah.max_iter
    kv = 2 * L * depths * (T + 1) * config.num_key_value_heads * config.head_dim * 4  # k, v fp32
    memory.mark()  # building the model (weights tied after to_empty) is not the prefill's cost
    next(tah.generate(model, ids, 1))
    peak = memory.peak() - before
    print(f"{L} layers, {T}-token prefill, fp32: weights {weights / 2**20:.0f} MiB, "
          f"KV cache ({depths} depths) {kv / 2**20:.0f} MiB")
    print(f"peak memory above the start: {peak / 2**20:.0f} MiB = {peak / (weights + kv):.2f}x "
          "weights + KV cache (target <= 1.2x)")

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (what, shape_, prompt, new, repeats) in COMMANDS.items():
        c = sub.add_parser(name, help=what, description=f"{what}: see python bench/inference.py "
                           "--help", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        c.add_argument("--shape", choices=list(SHAPES), default=shape_, help="model shape")
        c.add_argument("--layers", type=int, help="decoder layers (None: the shape's)")
        c.add_argument("--prompt-len", type=int, default=prompt, help="tokens of the prompt")
        c.add_argument("--threads", type=int, default=1, help="torch CPU threads")
        c.set_defaults(run=globals()[name], clock="wall")
        if name in ("cost", "batch"):
            c.add_argument("--clock", choices=["wall", "cpu"], default="cpu" if name == "batch"
                           else "wall", help="wall time, or this process's CPU time")
        if new:
            c.add_argument("--new-tokens", type=int, default=new,
                           help="tokens generated per run (cost: the decode steps timed)")
            c.add_argument("--repeats", type=int, default=repeats, help="interleaved repeats")
    sub.choices["decode"].add_argument("--seed", type=int, default=0,
                                       help="seed of the weights and the prompt")
    sub.choices["cost"].add_argument("--fractions", type=float, nargs="+",
                                     default=[0.0, 0.1, 0.5, 1.0],
                                     help="shares p of the tokens (and decode steps) iterating")
    sub.choices["batch"].add_argument("--batches", type=int, nargs="+", default=[1, 4, 16],
                                      help="batch sizes")
    return p.parse_args(argv)

def main(argv=None) -> None:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    a.run(a, time.process_time if a.clock == "cpu" else time.perf_counter)


if __name__ == "__main__":
    main()
