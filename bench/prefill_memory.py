"""Peak memory of a long prefill against what it must hold: the weights plus the KV cache.

A random Qwen3 at the Qwen3-0.6B shape (hidden 1024, 16/8 heads, head_dim 128, intermediate 3072,
vocab 151936, tied embeddings), cut to 2 layers, fp32 on the CPU. `tah.generate` prefills a
4096-token prompt and samples one token. The peak resident memory of this process, less what it
held before the model was built, is compared with the bytes of the weights plus the KV cache
(target <= 1.2x). Full (T, V) logits alone would be 4096 x 151936 x 4 bytes = 2.5 GB.

    python bench/prefill_memory.py                   # 2 layers, 4096 tokens
    python bench/prefill_memory.py --tokens 1024 --layers 4
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tah  # noqa: E402


def status_bytes(field: str) -> int:
    """VmRSS (resident now) or VmHWM (peak resident) of this process, from Linux's /proc."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # Linux: the peak restarts from the current
        f.write("5")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096, help="prompt length")
    ap.add_argument("--layers", type=int, default=2, help="decoder layers")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    config = tah.Qwen3Config(vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                             num_hidden_layers=args.layers, num_attention_heads=16,
                             num_key_value_heads=8, head_dim=128, torch_dtype="float32")
    torch.manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (1, args.tokens))
    before = status_bytes("VmRSS")
    with torch.device("meta"):
        model = tah.TaH(config)
    model = model.to_empty(device="cpu").eval()  # no init temporaries; to_empty unties the head
    model.lm_head.weight = model.model.embed_tokens.weight
    with torch.no_grad():
        for weight in model.parameters():
            weight.normal_(0.0, 0.02)
    del weight
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    depths = model.tah.max_iter
    kv = 2 * args.layers * depths * (args.tokens + 1) * 8 * 128 * 4  # k and v, every depth
    reset_peak()  # building the model (weights tied after to_empty) is not the prefill's cost
    with torch.no_grad():
        tok, passes = next(tah.generate(model, ids, 1))
    peak = status_bytes("VmHWM") - before
    need = weights + kv
    print(f"{args.layers} layers, {args.tokens}-token prefill, fp32: weights {weights / 2**20:.0f} MiB, "
          f"KV cache ({depths} depths) {kv / 2**20:.0f} MiB")
    print(f"peak memory above the start: {peak / 2**20:.0f} MiB = {peak / need:.2f}x weights + KV cache "
          f"(target <= 1.2x)")


if __name__ == "__main__":
    main()
