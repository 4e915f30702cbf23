"""Think-at-Hard (TaH) in one file of plain PyTorch.

TaH (Fu et al., "Think-at-Hard: Selective Latent Iterations to Improve Reasoning Language
Models", arXiv 2511.08577) takes a Qwen3 language model and gives the tokens that are hard to
predict a second, latent pass through the same layers:

  pass 1   every token goes through the plain Qwen3 (LoRA off) -> logits z1
  decide   a small MLP (the decider) reads pass-1 features and picks the hard tokens
  pass 2   each hard token re-enters layer 0 as a *soft token* (the top-k softmax of z1 mixed
           over embedding rows) at its own position, with LoRA on, and attends duo-causally:
           to earlier positions at its own depth or below -> logits z2
  output   z1 + z2 for the hard tokens, z1 for the rest (a residual in logit space)

Qwen3 facts used below: pre-norm RMSNorm, RMSNorm on every query/key head (q_norm/k_norm),
rotary embeddings on split halves, grouped-query attention, SwiGLU MLP, optional tied embeddings.
Sections, top to bottom, the model before the plumbing (each with the tutorial's chapter):
config (chapter 1) | Qwen3 blocks (chapter 1) | duo-causal attention (chapter 2) | LoRA (chapter
3) | the TaH model (chapters 3 and 4) | the decider (chapter 5) | generation (chapter 7) |
checkpoints (chapters 1 and 6) | tokenizer (chapter 7)

Dimensions: B batch, T tokens, T_d tokens at depth d, S key slots, N query heads, G key/value
heads, K head_dim, H hidden size, V vocab, L layers, d depth (pass number, 1-based).
"""
from __future__ import annotations

import copy
import json
import math
import os
import pickle
import shutil
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from tokenizers import Tokenizer as HFTokenizer


# --- config (chapter 1) --------------------------------------------------------------------------

@dataclass
class Qwen3Config:
    """The fields of a Hugging Face Qwen3 config.json that define the network (`qwen3_config`)."""

    vocab_size: int = 151936
    hidden_size: int = 1024
    intermediate_size: int = 3072
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 128  # given explicitly: NOT hidden_size // num_attention_heads for Qwen3
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 40960
    tie_word_embeddings: bool = True
    torch_dtype: str = "bfloat16"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None


@dataclass
class TaHConfig:
    """The TaH knobs (`tah_config` reads the authors' tah_config.json). lora_r = 0 means no LoRA;
    decider_layers = None means no decider."""

    max_iter: int = 2  # passes a token may get; 2 in every published recipe
    input_topk: int = 100  # pass-1 logits mixed into the soft token of the next pass
    lora_r: int = 16  # rank of the adapter that pass 2 adds to every linear (0: none)
    lora_alpha: float = 32  # the adapter's output is scaled by lora_alpha / lora_r
    lora_dropout: float = 0.1  # dropout on the adapter's input, in training only
    decider_layers: list[int] | None = None  # hidden-state indices it reads (see `TaH._pass`)
    decider_topk: int = 100  # top-k pass-1 logit values the decider reads, sorted descending
    decider_dims: list[int] = field(default_factory=lambda: [256] * 6)  # width of each block
    decider_expansion: int = 4  # the hidden width of a block's MLP, as a multiple of its width
    decider_dropout: float = 0.1  # dropout inside the decider's blocks, in training only
    threshold: float = 0.9  # iterate iff sigmoid(decider logit) > threshold


# --- Qwen3 blocks (chapter 1) --------------------------------------------------------------------
# Their projections are LoRALinear (chapter 3); their attention is the next section's (chapter 2).

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype  # normalise in fp32, scale in the input dtype (as Qwen3 does)
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_tables(pos: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, ...]:
    """cos and sin (B, T, K) in fp32 for integer positions (B, T)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=pos.device).float() / head_dim)
    angles = pos[..., None].float() * inv_freq  # (B, T, K/2)
    angles = torch.cat([angles, angles], dim=-1)  # (B, T, K): the two halves share frequencies
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates (B, heads, T, K) by the angles of its positions; pairs are (i, i + K/2).
    Why split halves and not neighbours (2i, 2i + 1): Qwen3's checkpoints were trained with this
    pairing, and the rotation is then two whole-tensor multiplies, no interleaving."""
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)  # (B, 1, T, K)
    x1, x2 = x.chunk(2, dim=-1)  # (B, heads, T, K/2) each
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class MLP(nn.Module):
    def __init__(self, config: Qwen3Config, tah: TaHConfig):
        super().__init__()
        self.gate_proj = LoRALinear(config.hidden_size, config.intermediate_size, tah)
        self.up_proj = LoRALinear(config.hidden_size, config.intermediate_size, tah)
        self.down_proj = LoRALinear(config.intermediate_size, config.hidden_size, tah)

    def forward(self, x: torch.Tensor, lora: bool) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x, lora)) * self.up_proj(x, lora), lora)


class DecoderLayer(nn.Module):
    def __init__(self, config: Qwen3Config, tah: TaHConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, tah, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, tah)

    def forward(self, x: torch.Tensor, keys: Keys, lora: bool) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), keys, lora)
        return x + self.mlp(self.post_attention_layernorm(x), lora)


# --- duo-causal attention (chapter 2) ------------------------------------------------------------
# While generating, Keys writes to a KVCache (the generation section, chapter 7).

def duo_causal_mask(q_pos, q_depth, k_pos, k_depth) -> torch.Tensor:
    """True = may attend. A query at (position i, depth d) sees a key at (j, e) iff j <= i and
    e <= d. That the key exists (token j really got pass e, and is not padding) is the caller's
    business: keys that were never computed are not in the cache, or are marked invalid."""
    return (k_pos <= q_pos) & (k_depth <= q_depth)


def attention_reference(q, k, v, mask):
    """Readable attention, (B, N, T, K) x (B, G, S, K) -> (B, N, T, K); the fast path is SDPA."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # (B, N, S, K): share kv heads
    v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, N, T, S)
    scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1) @ v


class Keys:
    """The keys of one forward in one place: per layer and depth their k/v, per depth their
    positions, depths and validity; in a KVCache when decoding, else each depth's packed tokens.
    `at_depth` gives the queries of one depth their view: `rope` tables, `mask` and `update`."""

    def __init__(self, config: Qwen3Config, cache: KVCache | None, end: int):
        self.config, self.cache, self.end = config, cache, end  # end: one past the newest slot
        self.kv: dict[tuple[int, int], tuple] = {}  # without a cache: (layer, depth) -> (k, v)
        self.meta: dict[int, tuple] = {}  # without a cache: depth -> (pos, depth, valid) (B, T_d)
        self.depth, self.slots, self.rope, self.mask = 0, None, None, None  # set by at_depth

    def at_depth(self, depth: int, pos, valid, slots) -> "Keys":
        """The view of the queries at `depth` with positions, validity and slots (B, T_d):
        records them as keys, and computes their RoPE tables and their mask (B, T_d, S)."""
        view = copy.copy(self)  # shares the k/v and the records above
        view.depth, view.slots = depth, slots
        view.rope = rope_tables(pos, self.config.head_dim, self.config.rope_theta)
        if self.cache is not None:
            k_pos, k_depth, k_valid = self.cache.write_meta(depth, slots, pos, valid, self.end)
        else:  # depth-major, like the keys in `update`: (B, S) each
            self.meta[depth] = (pos, torch.full_like(pos, depth), valid)
            lower = zip(*(self.meta[e] for e in range(1, depth + 1)))
            k_pos, k_depth, k_valid = (torch.cat(parts, 1) for parts in lower)
        mask = duo_causal_mask(pos[:, :, None], depth, k_pos[:, None], k_depth[:, None])
        view.mask = (mask & k_valid[:, None]) | ~valid[:, :, None]  # (B, T_d, S); padding
        return view  # queries may see anything (their rows are never used), so no row is empty

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Stores this depth's keys/values (B, G, T_d, K) of `layer`; returns every key and value
        (B, G, S, K) its queries may see, lowest depth first, in the order of the mask's keys."""
        if self.cache is not None:
            return self.cache.write(layer, self.depth, self.slots, k, v, self.end)
        self.kv[layer, self.depth] = (k, v)
        if self.depth == 1:
            return k, v
        # depth-major concatenation: pass 2 reads all pass-1 keys and the packed pass-2 keys;
        # one tensor keeps attention one SDPA call, and training needs no slots for absent keys
        kv = [self.kv[layer, e] for e in range(1, self.depth + 1)]
        return torch.cat([k for k, _ in kv], 2), torch.cat([v for _, v in kv], 2)


class Attention(nn.Module):
    def __init__(self, config: Qwen3Config, tah: TaHConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx  # where this layer's keys live in `Keys`
        self.n_heads, self.n_kv = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        self.q_proj = LoRALinear(config.hidden_size, q_dim, tah)
        self.k_proj = LoRALinear(config.hidden_size, kv_dim, tah)
        self.v_proj = LoRALinear(config.hidden_size, kv_dim, tah)
        self.o_proj = LoRALinear(q_dim, config.hidden_size, tah)
        self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, keys: Keys, lora: bool) -> torch.Tensor:
        """x (B, T, H) at one depth; `keys` is that depth's view (rope, mask, update)."""
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x, lora).view(B, T, self.n_heads, self.head_dim))  # (B,T,N,K)
        k = self.k_norm(self.k_proj(x, lora).view(B, T, self.n_kv, self.head_dim))  # (B,T,G,K)
        v = self.v_proj(x, lora).view(B, T, self.n_kv, self.head_dim)  # (B, T, G, K)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, K)
        q, k = apply_rope(q, *keys.rope), apply_rope(k, *keys.rope)
        k, v = keys.update(self.layer_idx, k.to(v.dtype), v)  # (B, G, S, K): every key it may see
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=keys.mask[:, None],
                                           enable_gqa=True)  # mask (B, 1, T, S)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, N*K)
        return self.o_proj(y, lora)


# --- LoRA (chapter 3) ----------------------------------------------------------------------------

class LoRALinear(nn.Module):
    """A bias-free Linear with an optional low-rank adapter that only pass 2 and later use:
    y = x W^T + (alpha / r) * B(A(dropout(x))). Keys: `weight`, `lora_A.weight`, `lora_B.weight`."""

    def __init__(self, n_in: int, n_out: int, tah: TaHConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_out, n_in))
        self.lora_A = self.lora_B = None
        if tah.lora_r > 0:
            self.lora_A = nn.Linear(n_in, tah.lora_r, bias=False)
            self.lora_B = nn.Linear(tah.lora_r, n_out, bias=False)
            self.dropout = nn.Dropout(tah.lora_dropout)
            self.scale = tah.lora_alpha / tah.lora_r

    def reset_lora(self) -> None:
        """PEFT's initialisation: A random, B zero, so a new adapter starts as a no-op."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor, lora: bool = False) -> torch.Tensor:
        y = F.linear(x, self.weight)
        if lora and self.lora_A is not None:
            y = y + self.lora_B(self.lora_A(self.dropout(x))) * self.scale
        return y


# --- the TaH model (chapters 3 and 4) ------------------------------------------------------------
# TaH.decider is the next section's Decider (chapter 5).

@dataclass
class Output:
    """What a forward returns. Final logits are made where asked: `logits` holds those of the
    last n positions (the call's `logits`: all, the last, none), `TaH.final_logits` any others."""

    logits: torch.Tensor | None  # (B, n, V): z1, plus z2 where a token iterated
    iter_count: torch.Tensor  # (B, T) passes each token got
    passes: list[torch.Tensor]  # per pass, final-norm hidden states (B, T, H); 0 where not run
    continue_logit: torch.Tensor | None = None  # (B, T) decider logit after pass 1
    hidden_states: list[torch.Tensor] | None = None  # pass 1's, index 0..L as `_pass` numbers them


def hard_first(active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Chooses and packs the hard tokens: for active (B, T) returns idx (B, T_d), the positions
    of each row's active tokens first (in order; a stable sort), T_d = the most actives in any
    row, and q_valid (B, T_d), False where a row with fewer actives is padded with inactives."""
    n = int(active.sum(1).max())
    idx = torch.argsort((~active).int(), dim=1, stable=True)[:, :n]  # (B, T_d) actives first
    return idx, active.gather(1, idx)


class TaHModel(nn.Module):  # the `model.` prefix of the checkpoint keys
    def __init__(self, config: Qwen3Config, tah: TaHConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, tah, i)
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class TaH(nn.Module):
    """Qwen3 with selective latent iterations. `policy` chooses who iterates: "decider", "standard"
    (nobody: exactly Qwen3), "always", or a (B, T) tensor of passes per token (training's oracle
    labels); None means "decider" for a model that has one, else "standard"."""

    def __init__(self, config: Qwen3Config, tah: TaHConfig | None = None):
        super().__init__()
        self.config, self.tah = config, tah or TaHConfig(lora_r=0)
        self.model = TaHModel(config, self.tah)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.decider = Decider(config, self.tah) if self.tah.decider_layers is not None else None
        self.grad_checkpointing = False  # recompute layers in backward (set by train.py)
        self.init_weights()

    def init_weights(self, std: float = 0.02) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding, LoRALinear)):
                nn.init.normal_(m.weight, std=std)
        for m in self.modules():  # after the loop above, which also visits lora_A and lora_B
            if isinstance(m, LoRALinear) and m.lora_A is not None:
                m.reset_lora()
        if self.decider is not None:
            self.decider.reset_parameters()

    def soft_token(self, logits: torch.Tensor) -> torch.Tensor:
        """The next pass's input (..., H) from logits (..., V): a softmax over the top-k logits
        mixing the matching embedding rows. It REPLACES the token's embedding."""
        return self.mix_embeddings(*logits.topk(self.tah.input_topk, dim=-1))

    def mix_embeddings(self, top: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """sum_k softmax(top)_k * E[idx_k] for the top-k values and ids (..., k), without
        materialising the (..., k, H) rows; only the top-k selection is not smooth."""
        E = self.model.embed_tokens.weight
        w = top.float().softmax(dim=-1).to(E.dtype)  # (..., k)
        mix = F.embedding_bag(idx.reshape(-1, idx.shape[-1]), E, mode="sum",  # (n, H) for the
                              per_sample_weights=w.reshape(-1, idx.shape[-1]))  # n = prod(...)
        return mix.view(*idx.shape[:-1], E.shape[1])  # (..., H)

    def head_topk(self, h: torch.Tensor, k: int, chunk: int = 256) -> tuple[torch.Tensor, ...]:
        """Top-k values and ids (B, T, k) of the logits lm_head(h) of hidden states h (B, T, H),
        made `chunk` rows at a time: no (B, T, V) tensor."""
        B, T, H = h.shape
        tops = [self.lm_head(rows).topk(k, dim=-1)  # (chunk, V) logits, then only (chunk, k)
                for rows in h.reshape(B * T, H).split(chunk)]
        values, ids = torch.cat([t.values for t in tops]), torch.cat([t.indices for t in tops])
        return values.view(B, T, k), ids.view(B, T, k)

    def topk_at(self, idx: torch.Tensor, passes: list[torch.Tensor], z1=None,
                k: int | None = None) -> tuple[torch.Tensor, ...]:
        """Top-k values and ids (B, T_d, k) of the logits so far, z1 + z2 + ..., at the positions
        idx (B, T_d): from z1 (B, T, V) where the forward made it whole, else made here from
        lm_head(h1 + h2 + ...) (the same logits: the head is linear), in chunks."""
        k, rows = k or self.tah.input_topk, torch.arange(len(idx), device=idx.device)[:, None]
        if z1 is not None:
            return z1[rows, idx].topk(k, dim=-1)
        return self.head_topk(sum(p[rows, idx] for p in passes), k)

    def add_logit_residual(self, z: torch.Tensor, out: Output, start: int,
                           depth: int | None = None) -> torch.Tensor:
        """The logit residual, in place: to z (B, n, V), pass 1's logits z1 of positions start..,
        adds z_d = lm_head(h_d) of each later pass d (up to `depth`) where a token got it."""
        for d, h in enumerate(out.passes[1:depth], start=2):
            b, t = (out.iter_count[:, start:start + z.shape[1]] >= d).nonzero(as_tuple=True)
            z.index_put_((b, t), self.lm_head(h[b, start + t]), accumulate=True)  # z_d (n_d, V)
        return z

    def final_logits(self, out: Output, start: int = 0, end: int | None = None,
                     depth: int | None = None) -> torch.Tensor:
        """The logits (B, end - start, V) of positions start..end-1 after `depth` passes (all by
        default), from the passes' hidden states: how a training step makes them, in chunks."""
        z = self.lm_head(out.passes[0][:, start:end])  # z1
        return self.add_logit_residual(z, out, start, depth)

    def _pass(self, x: torch.Tensor, keys: Keys, keep: set[int] = frozenset()):
        """Runs every layer at one depth over the tokens x (B, T_d, H), with the view `keys`.
        Returns the last layer's output and the hidden states whose index is in `keep`: 0 = the
        input, k = layer k's output (`forward` sets L to the final norm's, as Hugging Face does)."""
        lora = keys.depth > 1  # the adapter belongs to pass 2 and later
        kept = {0: x} if 0 in keep else {}
        for i, layer in enumerate(self.model.layers):
            if self.grad_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, keys, lora, use_reentrant=False)
            else:
                x = layer(x, keys, lora)
            if i + 1 in keep:
                kept[i + 1] = x
        return x, kept

    def forward(self, input_ids: torch.Tensor, policy: str | torch.Tensor | None = None, *,
                positions: torch.Tensor | None = None, valid: torch.Tensor | None = None,
                cache: KVCache | None = None, start: int = 0, threshold: float | None = None,
                output_hidden_states: bool = False, logits: str = "all") -> Output:
        """input_ids (B, T) occupy cache slots start..start+T-1. `valid` (B, T) marks real tokens
        (False = padding); positions (B, T) default to the count of real tokens before each.
        `logits`: whose final logits Output holds, "all", "last" (generation samples from them) or
        "none" (training makes them in chunks, `final_logits`). No other (B, T, V) is made."""
        B, T = input_ids.shape
        L, max_iter = self.config.num_hidden_layers, self.tah.max_iter
        valid = torch.ones_like(input_ids, dtype=torch.bool) if valid is None else valid
        positions = start + (valid.cumsum(1) - 1).clamp(min=0) if positions is None else positions
        policy = ("standard" if self.decider is None else "decider") if policy is None else policy
        named = isinstance(policy, str)
        allowed = ("standard", "always") + ("decider",) * (self.decider is not None)
        if named and policy not in allowed:
            raise ValueError(f"policy {policy!r}: use 'standard', 'always', a (B, T) tensor of "
                             "passes, or 'decider' with a model that has one")
        n = dict(all=T, last=1, none=0).get(logits)  # the last n positions get their logits
        if n is None:
            raise ValueError(f"logits must be 'all', 'last' or 'none', not {logits!r}")
        use_decider = named and self.decider is not None  # its logit comes with every named policy
        keep = set(range(L + 1)) if output_hidden_states else set()
        if use_decider:
            keep |= set(self.tah.decider_layers)
        slots = start + torch.arange(T, device=input_ids.device).expand(B, T)  # (B, T)
        keys = Keys(self.config, cache, end=start + T)
        rows = torch.arange(B, device=input_ids.device)[:, None]  # (B, 1), to gather with idx

        # pass 1: the plain Qwen3 over every token, LoRA off
        x = self.model.embed_tokens(input_ids)  # (B, T, H)
        x, kept = self._pass(x, keys.at_depth(1, positions, valid, slots), keep)
        h = kept[L] = self.model.norm(x)  # (B, T, H): hidden-state index L, the final norm's
        hidden = [kept[i] for i in range(L + 1)] if output_hidden_states else None
        z = self.lm_head(h[:, T - n:])  # z1 (B, n, V) of the positions whose logits are returned
        whole = z if n == T else None  # z1 of every position, if made: top-k from it needs no head

        # decide: the decider (or the policy) picks the hard tokens; the decider reads top-k logits
        continue_logit = self.decider(kept, whole if whole is not None else self.head_topk(
            h, self.tah.decider_topk)[0]) if use_decider else None
        iter_count = valid.long()
        active = self._decide(policy, 1, continue_logit, threshold, valid)
        passes = [h]

        # pass 2 (and later): only the hard tokens, packed, as soft tokens at their own positions
        for depth in range(2, max_iter + 1):
            if not active.any():
                break
            iter_count = iter_count + active.long()
            idx, q_valid = hard_first(active)  # (B, T_d) each
            # the soft token: the top-k of the logits so far at these tokens, mixing embedding rows
            x = self.mix_embeddings(*self.topk_at(idx, passes, whole if depth == 2 else None))
            view = keys.at_depth(depth, positions[rows, idx], q_valid, slots[rows, idx])
            x, kept_d = self._pass(x, view, keep if depth < max_iter else set())
            h_d = self.model.norm(x).masked_fill(~q_valid[..., None], 0.0)  # (B, T_d, H)
            passes.append(torch.zeros_like(h).index_put((rows, idx), h_d))  # (B, T, H)
            if depth < max_iter:  # who goes on: decided among this depth's tokens, scattered back
                sub = policy if named else policy.gather(1, idx)
                c = self.decider({**kept_d, L: h_d}, self.topk_at(
                    idx, passes, k=self.tah.decider_topk)[0]) if use_decider else None
                go = self._decide(sub, depth, c, threshold, q_valid)
                active = torch.zeros_like(active).scatter(1, idx, go)

        # output: the logit residual, z1 + z2 at the hard tokens, for the positions returned
        out = Output(None, iter_count, passes, continue_logit, hidden)
        out.logits = self.add_logit_residual(z, out, start=T - n) if n else None
        return out

    def _decide(self, policy, depth, continue_logit, threshold, valid):
        """Which tokens (B, T) get pass depth+1: by the labels, nobody, everybody, or the decider
        (in fp32 with a strict '>', as the authors' decider compares)."""
        if isinstance(policy, torch.Tensor):
            return (policy > depth) & valid
        if policy != "decider":
            return valid & (policy == "always")
        t = self.tah.threshold if threshold is None else threshold
        prob = torch.sigmoid(continue_logit.float())
        return (prob > torch.tensor(t, dtype=torch.float32)) & valid


# --- the decider (chapter 5) ---------------------------------------------------------------------

class ResidualBlock(nn.Module):
    """x + MLP(LayerNorm(x)); a Linear skip replaces the identity where the width changes."""

    def __init__(self, n_in: int, n_out: int, expansion: int, dropout: float):
        super().__init__()
        self.layer_norm = nn.LayerNorm(n_in)
        self.mlp = nn.Sequential(nn.Linear(n_in, expansion * n_in), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(expansion * n_in, n_out), nn.Dropout(dropout))
        self.dim_change = nn.Linear(n_in, n_out) if n_in != n_out else nn.Identity()

    def forward(self, x):
        return self.dim_change(x) + self.mlp(self.layer_norm(x))


class DeciderBackbone(nn.Module):
    def __init__(self, dims: list[int], expansion: int, dropout: float):
        super().__init__()
        self.input_projection = nn.Linear(dims[0], dims[0])
        self.blocks = nn.ModuleList(ResidualBlock(a, b, expansion, dropout)
                                    for a, b in zip(dims, dims[1:] + dims[-1:]))
        self.output_layer = nn.Sequential(nn.LayerNorm(dims[-1]), nn.Linear(dims[-1], 1))

    def forward(self, x):
        x = self.input_projection(x)
        for block in self.blocks:
            x = block(x)
        return self.output_layer(x)


class Decider(nn.Module):
    """Reads pass-1 features of each token and returns the logit of "think again": the hidden
    states at `decider_layers` concatenated with a projection of the top-k logit values."""

    def __init__(self, config: Qwen3Config, tah: TaHConfig):
        super().__init__()
        self.layers, self.topk = list(tah.decider_layers), tah.decider_topk
        self.logits_projection = nn.Linear(tah.decider_topk, config.hidden_size)
        n_in = (len(self.layers) + 1) * config.hidden_size
        self.combined_projection = nn.Linear(n_in, tah.decider_dims[0])
        self.backbone = DeciderBackbone(list(tah.decider_dims), tah.decider_expansion,
                                        tah.decider_dropout)

    def reset_parameters(self) -> None:
        """As the authors initialise it: every Linear of the backbone Kaiming-normal with zero
        bias; the two projections and the LayerNorms keep PyTorch's defaults."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.LayerNorm)):
                m.reset_parameters()
        for m in self.backbone.modules():
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight)  # std sqrt(2 / fan_in)
                nn.init.zeros_(m.bias)

    def forward(self, hidden: dict[int, torch.Tensor], logits: torch.Tensor) -> torch.Tensor:
        """hidden: index -> (B, T, H); logits (B, T, V), or their top values (B, T, >= k) sorted
        descending (what a forward that never holds all logits passes) -> continue logit (B, T)."""
        dtype = self.combined_projection.weight.dtype  # the decider stays in fp32
        top = logits.topk(self.topk, dim=-1).values.to(dtype)  # (B, T, k), sorted descending
        feats = [hidden[i].to(dtype) for i in self.layers] + [self.logits_projection(top)]
        x = self.combined_projection(torch.cat(feats, dim=-1))  # (B, T, D0)
        return self.backbone(x).squeeze(-1)


# --- generation (chapter 7) ----------------------------------------------------------------------

class KVCache:
    """Keys and values of every layer and depth for generation, written at explicit slots.
    Slot s of depth d lives at index (d - 1) * max_len + s (depth-major), so everything a query
    of depth d may see (the lower depths whole, its own depth up to the newest slot) is one view:
    nothing is copied per step. `valid` (B, max_iter * max_len) marks the entries that exist."""

    def __init__(self, model: "TaH", batch_size: int, max_len: int, device=None, dtype=None):
        config, max_iter, self.max_len = model.config, model.tah.max_iter, max_len
        weight = model.model.embed_tokens.weight
        device, dtype = device or weight.device, dtype or weight.dtype
        shape = (batch_size, config.num_key_value_heads, max_iter * max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype)
                  for _ in range(config.num_hidden_layers)]  # per layer (B, G, D*S, K)
        self.v = [torch.zeros_like(k) for k in self.k]
        self.pos = torch.zeros(batch_size, max_iter * max_len, dtype=torch.long, device=device)
        self.valid = torch.zeros(batch_size, max_iter * max_len, dtype=torch.bool, device=device)
        slot = torch.arange(max_iter * max_len, device=device)[None]  # (1, D*S)
        self.depth = slot // max_len + 1  # (1, D*S): the depth each slot belongs to

    def write_meta(self, depth: int, slots, pos, valid, end: int) -> tuple[torch.Tensor, ...]:
        """Records positions/validity (B, T_d) of new entries; returns the positions, depths
        and validity (B, n) of the n = (depth - 1) * max_len + end entries a query sees."""
        at = (depth - 1) * self.max_len + slots  # (B, T_d)
        self.pos.scatter_(1, at, pos)
        self.valid.scatter_(1, at, valid)
        n = (depth - 1) * self.max_len + end
        return self.pos[:, :n], self.depth[:, :n], self.valid[:, :n]

    def write(self, layer: int, depth: int, slots, k, v, end: int) -> tuple[torch.Tensor, ...]:
        """Stores new keys/values (B, G, T_d, K) at their slots; returns (B, G, n, K) views."""
        at = ((depth - 1) * self.max_len + slots)[:, None, :, None].expand_as(k)  # (B, G, T_d, K)
        self.k[layer].scatter_(2, at, k)
        self.v[layer].scatter_(2, at, v)
        n = (depth - 1) * self.max_len + end
        return self.k[layer][:, :, :n], self.v[layer][:, :, :n]

    def keep(self, rows: torch.Tensor) -> None:
        """Keeps only the batch rows `rows` (B,) bool, e.g. those still generating."""
        self.k, self.v = [k[rows] for k in self.k], [v[rows] for v in self.v]
        self.pos, self.valid = self.pos[rows], self.valid[rows]


def default_device() -> str:
    """The first of cuda, mps, cpu that this machine has."""
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
           min_p: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next tokens (B,) from logits (B, V): argmax when temperature is 0."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if min_p:
        probs = probs.masked_fill(probs < min_p * probs.max(-1, keepdim=True).values, 0.0)
    if top_p < 1.0:  # keep the smallest set of most likely tokens whose mass reaches top_p
        p, idx = probs.sort(-1, descending=True)
        drop = p.cumsum(-1) - p > top_p
        probs = probs.scatter(-1, idx, p.masked_fill(drop, 0.0))
    probs = probs / probs.sum(-1, keepdim=True)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


PREFILL_CHUNK = 512  # prompt tokens per prefill forward: bounds the activations of long prompts


@torch.no_grad()
def generate(model: TaH, input_ids: torch.Tensor | list[int], max_new_tokens: int, *,
             policy: str | None = None, valid: torch.Tensor | None = None, stop_ids=(),
             threshold: float | None = None, generator: torch.Generator | None = None,
             **sampling) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Streams (tokens (B,), passes (B,)): each token and the passes its predicting position got.
    Prompts are left-padded (`valid` marks real tokens); prefill is the full TaH forward, a decode
    step pass 1, decider, maybe pass 2 (a KV cache per depth). A stopped row repeats its stop id."""
    ids = torch.as_tensor(input_ids, device=model.lm_head.weight.device)
    ids = ids[None] if ids.dim() == 1 else ids
    B, T = ids.shape
    limit = model.config.max_position_embeddings
    if T >= limit:
        raise ValueError(f"the prompt has {T} tokens but the model's context is {limit}; cut it")
    max_new_tokens = min(max_new_tokens, limit - T)
    valid = torch.ones_like(ids, dtype=torch.bool) if valid is None else valid.to(ids.device)
    cache = KVCache(model, B, T + max_new_tokens)
    pos = (valid.cumsum(1) - 1).clamp(min=0)  # (B, T)
    for s in range(0, T, PREFILL_CHUNK):  # through the cache, pieces compute one forward
        e = min(s + PREFILL_CHUNK, T)
        out = model(ids[:, s:e], policy, positions=pos[:, s:e], valid=valid[:, s:e],
                    cache=cache, start=s, threshold=threshold, logits="last")
    live = torch.arange(B, device=ids.device)  # the rows still generating, as `out` has them
    pos = pos[:, -1:]  # (B, 1)
    stop = torch.tensor(list(stop_ids), dtype=torch.long, device=ids.device)
    tokens = torch.zeros(B, dtype=torch.long, device=ids.device)  # what each row yields
    for step in range(max_new_tokens):
        tok = sample(out.logits[:, -1], generator=generator, **sampling)  # (live,)
        passes = torch.zeros_like(tokens)
        tokens[live], passes[live] = tok, out.iter_count[:, -1]
        yield tokens.clone(), passes
        going = ~torch.isin(tok, stop)  # (live,)
        if not going.any() or step == max_new_tokens - 1:
            return
        if not going.all():  # finished rows leave the batch and the cache
            live, tok, pos = live[going], tok[going], pos[going]
            cache.keep(going)
        pos = pos + 1
        out = model(tok[:, None], policy, positions=pos, cache=cache, start=T + step,
                    threshold=threshold, logits="last")


# --- checkpoints (chapters 1 and 6) --------------------------------------------------------------
# Reading configs (with what tah.py refuses), the authors' layout, load, add_parts, save.

def _fill(cls, values: dict, most: dict | None = None):
    """A `cls` dataclass with `values` for its fields (absent or null: the default), each of its
    default's type; integers in [1, 2**20], numbers >= 0 and finite, at most `most[field]`."""
    obj = cls()
    for f in fields(cls):
        v, default = values.get(f.name), getattr(obj, f.name)
        if v is None or default is None:  # absent, or a token id (tah.py never reads those)
            continue
        kind, number = type(default), type(default) in (int, float)
        low, top = (1, 2**20) if kind is int else (0, 1e30)
        top = (most or {}).get(f.name, top)
        if not (type(v) is kind or kind is float and type(v) is int) or \
                number and not low <= v <= top:  # NaN and inf fail the bound too
            raise ValueError(f"{f.name} is {v!r}; it must be {kind.__name__}" +
                             f" in [{low}, {top}]" * number)
        setattr(obj, f.name, v)
    return obj


def qwen3_config(d: dict) -> Qwen3Config:
    """The known keys of a config.json; refuses what tah.py does not implement."""
    if d.get("model_type", "qwen3") != "qwen3":
        raise ValueError(f"model_type is {d['model_type']!r}; tah.py implements only 'qwen3' "
                         "(Qwen3 dense models such as Qwen/Qwen3-0.6B-Base)")
    for rope in (d.get("rope_scaling"), d.get("rope_parameters")):  # older, newer transformers
        if rope and rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ValueError("it asks for scaled RoPE; tah.py implements only plain RoPE")
    if d.get("attention_bias") or d.get("use_sliding_window"):
        raise ValueError("it asks for attention biases or sliding windows; Qwen3 dense models "
                         "use neither and tah.py implements neither")
    rope_theta = (d.get("rope_parameters") or {}).get("rope_theta")  # where newer ones keep it
    cfg = _fill(Qwen3Config, {"rope_theta": rope_theta, "torch_dtype": d.get("dtype"), **d})
    if d.get("head_dim") is None:  # older configs: hidden_size split over the heads
        cfg.head_dim = cfg.hidden_size // cfg.num_attention_heads
    if cfg.num_attention_heads % cfg.num_key_value_heads or cfg.head_dim % 2:
        raise ValueError(f"num_attention_heads ({cfg.num_attention_heads}) must be a multiple "
                         f"of num_key_value_heads ({cfg.num_key_value_heads}), head_dim "
                         f"({cfg.head_dim}) even")
    return cfg


IMPLEMENTED = {  # tah_config.json's variants in the authors' code -> those tah.py implements
    "input_updater": (None, "TrivialUpdater"),  # with topk: the top-k soft token
    "output_updater": (None, "AdditiveLogitsUpdater"),  # z1 + z2
    "iter_attention_mode": (None, "duo"),  # duo-causal attention
    "iter_label_generator": (None, "FixedIterLabelGenerator", "DynamicMismatchIterLabelGenerator"),
    "adapter": (None, "lora"),
    "iter_decider": (None, "MLPIterDecider", "IterLabelDecider"),  # the last: oracle labels only
}
SCHEMA = {  # tah_config.json's keys ("group.key": `key` in the object `group`) -> TaHConfig's
    "max_iter": "max_iter", "input_updater_kwargs.topk": "input_topk",
    "adapter_kwargs.r": "lora_r", "adapter_kwargs.lora_alpha": "lora_alpha",
    "adapter_kwargs.lora_dropout": "lora_dropout",
    "iter_decider_kwargs.hidden_states_layer_nums": "decider_layers",
    "iter_decider_kwargs.topk": "decider_topk", "iter_decider_kwargs.hidden_dims": "decider_dims",
    "iter_decider_kwargs.expansion_factor": "decider_expansion",
    "iter_decider_kwargs.dropout_rate": "decider_dropout",
    "iter_decider_kwargs.threshold": "threshold"}


def tah_config(j: dict, config: Qwen3Config) -> TaHConfig:
    """Reads a tah_config.json in the authors' schema (`tah_config_json` writes it) for the
    backbone `config`; refuses the variants tah.py does not implement."""
    flat = j | {f"{group}.{k}": v for group, kwargs in j.items() if type(kwargs) is dict
                for k, v in kwargs.items()}
    for key, ok in IMPLEMENTED.items():
        if j.get(key) not in ok:
            raise ValueError(f"{key} = {j[key]!r}: tah.py implements only {ok[1:]}")
    if flat.get("input_updater_kwargs.use_hidden_states") or \
            flat.get("input_updater_kwargs.topk", 0) is None or \
            flat.get("iter_decider_kwargs.normalize_input"):
        raise ValueError("it asks for a hidden-state or full-softmax input to pass 2, or a "
                         "normalised decider input; tah.py implements neither")
    lora, decider = j.get("adapter") == "lora", j.get("iter_decider") == "MLPIterDecider"
    if lora and None in (flat.get("adapter_kwargs.r"), flat.get("adapter_kwargs.lora_alpha")):
        raise ValueError("adapter_kwargs must give r and lora_alpha")
    V, L = config.vocab_size, config.num_hidden_layers
    t = _fill(TaHConfig, {ours: flat.get(theirs) for theirs, ours in SCHEMA.items()}, most=dict(
        input_topk=V, decider_topk=V, lora_dropout=1, decider_dropout=1, threshold=1))
    t.lora_r = t.lora_r if lora else 0
    t.decider_layers = flat.get("iter_decider_kwargs.hidden_states_layer_nums")  # _fill skips
    if decider and not (type(t.decider_layers) is list and t.decider_layers and
                        all(type(i) is int and 0 <= i <= L for i in t.decider_layers)):
        raise ValueError(f"hidden_states_layer_nums is {t.decider_layers!r}; it must list "
                         f"hidden-state indices in [0, {L}]")
    t.decider_layers = t.decider_layers if decider else None
    return t


def tah_config_json(t: TaHConfig, hidden_size: int) -> dict:
    """The authors' tah_config.json schema for `t`, which `tah_config` reads back."""
    lora, decider = t.lora_r > 0, t.decider_layers is not None
    j = {"max_iter": t.max_iter, "iter_attention_mode": "duo", "input_updater_kwargs": {},
         "output_updater": "AdditiveLogitsUpdater", "adapter": "lora" if lora else None,
         "iter_decider": "MLPIterDecider" if decider else None}
    if lora:
        j["adapter_kwargs"] = {"target_modules": "all-linear", "bias": "none"}
    if decider:
        j["iter_decider_kwargs"] = {"hidden_states_size": hidden_size, "normalize_input": False,
                                    "max_iter": t.max_iter}
    for theirs, ours in SCHEMA.items():
        group, _, key = theirs.rpartition(".")
        if not group or group in j:  # the groups of the parts this model has
            (j[group] if group else j)[key] = getattr(t, ours)
    return j


def resolve(path_or_id: str | os.PathLike) -> Path:
    """A local directory as it is, or a hub id ("Qwen/Qwen3-0.6B") downloaded to the local cache."""
    p = Path(path_or_id).expanduser()
    if p.is_dir():
        return p
    name = str(path_or_id)
    if p.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise FileNotFoundError(f"{name}: no such model directory "
                                "(a hub id looks like 'Qwen/Qwen3-0.6B')")
    try:
        from huggingface_hub import snapshot_download
        files = ["*.json", "*.safetensors", "tokenizer*", "iter_decider.bin", "lora/*"]  # no code
        return Path(snapshot_download(name, allow_patterns=files))
    except Exception as e:
        raise OSError(f"could not get {name!r} from the hub ({type(e).__name__}: {e}). Offline? "
                      f"`hf download {name} --local-dir DIR`, then pass the directory") from None


@contextmanager
def reading(path):
    """The one guard around reading a file: what json, safetensors, torch.load, tokenizers or
    load_state_dict report about it becomes one line that names it (FileNotFoundError if it is
    missing, else ValueError)."""
    try:
        yield
    except Exception as e:
        if isinstance(e, FileNotFoundError) or isinstance(path, Path) and not path.exists():
            raise FileNotFoundError(f"{getattr(e, 'filename', None) or path} is missing: the "
                                    "checkpoint is not whole; download or save it again") from None
        why = " ".join(str(e).split())  # the library's message, on one line
        why = why if isinstance(e, ValueError) else f"{type(e).__name__}: {why}"
        if isinstance(e, pickle.UnpicklingError):  # torch's own would invite weights_only=False
            why = "torch.load(weights_only=True) refuses it: it holds more than tensors"
        raise ValueError(f"{path}: {why[:400]}; the file is damaged or does not belong with the "
                         "others: fix it, or download or save the checkpoint again") from None


def read_json(path: Path) -> dict:
    j = json.loads(path.read_text(encoding="utf-8"))
    if type(j) is not dict:
        raise ValueError("it does not hold a JSON object")
    return j


FILES = {"model": "model.safetensors", "lora": "lora/adapter_model.safetensors",
         "decider": "decider.safetensors"}  # the parts of a checkpoint


def _owner(key: str) -> str:
    """The part of a checkpoint that stores the model's tensor `key`."""
    return "lora" if ".lora_" in key else "decider" if key.startswith("decider.") else "model"


def _checkpoint_files(d: Path, model: TaH) -> list[tuple[str, Path]]:
    """(part, file) for each file of the checkpoint in d that `model` (built from it) reads."""
    files = [("model", d / FILES["model"])]
    index = d / "model.safetensors.index.json"
    if index.exists():  # shards
        with reading(index):
            files = [("model", d / s) for s in sorted(set(read_json(index)["weight_map"].values()))]
            if any(f.parent != d for _, f in files):
                raise ValueError(f"weight_map must name files in {d}")
    elif not files[0][1].exists() and [*d.glob("pytorch_model*.bin"), *d.glob("*.pt")]:
        raise ValueError(f"{d} has weights only as pickles (.bin/.pt); tah loads safetensors only. "
                         "Convert them to model.safetensors with a tool you trust.")
    if model.tah.lora_r:
        files.append(("lora", d / FILES["lora"]))
    if model.decider is not None:  # ours, or else the authors' torch.save dict
        ours, theirs = d / FILES["decider"], d / "iter_decider.bin"
        files.append(("decider", theirs if theirs.exists() and not ours.exists() else ours))
    return files


def _tensors(f: Path, device, dtype) -> dict[str, torch.Tensor]:
    """The tensors of file f under the model's names; floating-point ones cast to dtype."""
    if f.name == "iter_decider.bin":  # the authors' torch.save dict: class, init_args, state_dict
        state = torch.load(f, map_location=device, weights_only=True)["state_dict"]
        state.pop("threshold", None)  # tah_config.json's threshold wins, as in the authors' loader
        return {"decider." + k: v.to(dtype) if v.is_floating_point() else v
                for k, v in state.items()}
    prefix = "base_model.model." if f.parent.name == "lora" else ""  # PEFT's names
    add = "decider." if f.name == "decider.safetensors" else ""
    out = {}
    with safe_open(str(f), framework="pt", device=str(device)) as st:
        for k in st.keys():  # one tensor at a time: never a second copy of the model
            t = st.get_tensor(k)
            t = t.to(dtype) if t.is_floating_point() else t
            # a tensor at an unaligned address in the file's buffer slows matmuls by ~12%: copy it
            out[add + k.removeprefix(prefix)] = t.clone() if t.data_ptr() % 64 else t
    return out


def load(path_or_id: str | os.PathLike, device=None, dtype: torch.dtype | None = None) -> TaH:
    """Loads a Qwen3 or TaH checkpoint, a local directory or a hub id: config.json and
    model.safetensors (or shards); with tah_config.json also lora/ and the decider (ours, or the
    authors' iter_decider.bin). dtype: float32 on the CPU, else bfloat16 (the decider float32).
    Strict: a file missing, damaged or at odds with the others is an error that names it."""
    d = resolve(path_or_id)
    with reading(d / "config.json"):
        config = qwen3_config(read_json(d / "config.json"))
    tah_file, peft = d / "tah_config.json", d / "lora" / "adapter_config.json"
    with reading(tah_file if tah_file.exists() else d / "config.json"):
        tah = tah_config(read_json(tah_file), config) if tah_file.exists() else \
            TaHConfig(lora_r=0)  # a plain Qwen3
        with torch.device("meta"):
            model = TaH(config, tah)  # torch checks the rest of the values as it builds
    if tah.lora_r and peft.exists():  # PEFT's own record of the adapter must agree
        with reading(peft):
            j, ours = read_json(peft), (tah.lora_r, tah.lora_alpha)
            if (j.get("r", ours[0]), j.get("lora_alpha", ours[1])) != ours:
                raise ValueError(f"r, lora_alpha = {j.get('r')}, {j.get('lora_alpha')} disagree "
                                 f"with tah_config.json's {ours}")
    device = torch.device(device or "cpu")
    dtype = dtype or (torch.float32 if device.type == "cpu" else torch.bfloat16)
    state, files = {}, _checkpoint_files(d, model)
    for part, f in files:
        with reading(f):
            tensors = _tensors(f, device, torch.float32 if part == "decider" else dtype)
            if [k for k in tensors if _owner(k) != part]:  # a file may fill only its own part
                raise ValueError(f"unexpected {[k for k in tensors if _owner(k) != part][:10]}")
        state |= tensors
    if config.tie_word_embeddings and "model.embed_tokens.weight" in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]  # stored by the file or not
    with reading(", ".join(str(f) for _, f in files)):
        model.load_state_dict(state, strict=True, assign=True)  # missing, unexpected, shapes
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def add_parts(model: TaH, tah: TaHConfig) -> TaH:
    """`model` with the TaH settings `tah`, for training: it keeps every weight `model` has
    (shared, not copied), and a LoRA adapter or decider that `tah` asks for and `model` lacks
    starts fresh: the LoRA as a no-op (B = 0), the decider at its initialisation, in fp32."""
    p = model.lm_head.weight
    with torch.device("meta"):
        new = TaH(model.config, tah)
    new.load_state_dict(model.state_dict(), strict=False, assign=True)  # what model has
    for m in new.modules():  # what it lacks is still on the meta device
        if isinstance(m, LoRALinear) and m.lora_A is not None and m.lora_A.weight.is_meta:
            m.lora_A.to_empty(device=p.device).to(p.dtype)
            m.lora_B.to_empty(device=p.device).to(p.dtype)
            m.reset_lora()
    if new.decider is not None and new.decider.logits_projection.weight.is_meta:
        new.decider.to_empty(device=p.device).float().reset_parameters()
    if model.config.tie_word_embeddings:
        new.lm_head.weight = new.model.embed_tokens.weight
    return new.train(model.training)


def save(model: TaH, path: str | os.PathLike,
         tokenizer_dir: str | os.PathLike | None = None) -> None:
    """Writes what `load` reads back exactly, safetensors + JSON only: a plain Hugging Face Qwen3,
    lora/ (PEFT's layout), decider.safetensors and tah_config.json (the authors' schema), into a
    temporary directory swapped in at the end: an interruption leaves no half-written checkpoint."""
    path = Path(path)  # every file and folder made as usual (umask modes), none fixed afterwards
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted save
    tmp.mkdir(parents=True)
    parts = {part: {} for part in FILES}
    for k, v in model.state_dict().items():
        if not (model.config.tie_word_embeddings and k == "lm_head.weight"):
            part = _owner(k)  # the names as PEFT and the authors' decider files have them:
            name = "base_model.model." + k if part == "lora" else k.removeprefix("decider.")
            parts[part][name] = v.detach().contiguous().cpu()
    dtype = str(model.lm_head.weight.dtype).removeprefix("torch.")
    jsons = {"config.json": {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
                             **asdict(model.config), "torch_dtype": dtype}}
    if model.tah != TaHConfig(lora_r=0):  # anything but a plain Qwen3
        jsons["tah_config.json"] = tah_config_json(model.tah, model.config.hidden_size)
    if model.tah.lora_r:
        jsons["lora/adapter_config.json"] = {
            "peft_type": "LORA", "r": model.tah.lora_r, "lora_alpha": model.tah.lora_alpha,
            "lora_dropout": model.tah.lora_dropout, "bias": "none", "target_modules":
            ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
    for part, tensors in parts.items():  # as plain bytes: safetensors' writer makes 0600 files
        if tensors:
            (tmp / FILES[part]).parent.mkdir(exist_ok=True)
            (tmp / FILES[part]).write_bytes(safetensors_bytes(tensors, metadata={"format": "pt"}))
    for name, j in jsons.items():
        (tmp / name).write_text(json.dumps(j, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "generation_config.json"):
        if tokenizer_dir and (Path(tokenizer_dir) / name).exists():
            shutil.copyfile(Path(tokenizer_dir) / name, tmp / name)
    old = path.with_name(f".{path.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


# --- tokenizer (chapter 7) -----------------------------------------------------------------------

class Tokenizer:
    """A Hugging Face tokenizer.json read with `tokenizers`, plus Qwen3's chat format by hand.
    Special tokens are looked up by their strings; a vocabulary without them has no chat format."""

    def __init__(self, directory: Path):
        with reading(directory / "tokenizer.json"):
            self.tok = HFTokenizer.from_file(str(directory / "tokenizer.json"))
        cfg_path, cfg = directory / "tokenizer_config.json", {}
        if cfg_path.exists():
            with reading(cfg_path):
                cfg = read_json(cfg_path)
        eos = cfg.get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
        token_id = self.tok.token_to_id
        self.im_start, self.im_end = token_id("<|im_start|>"), token_id("<|im_end|>")
        self.think, self.end_think = token_id("<think>"), token_id("</think>")
        stops = [self.im_end, token_id("<|endoftext|>"), eos and token_id(eos)]
        self.stop_ids = sorted({i for i in stops if i is not None})
        self.has_chat = self.im_start is not None and self.im_end is not None

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def chat(self, messages: list[dict], add_generation_prompt: bool = True,
             enable_thinking: bool = True) -> str:
        """Qwen3's template: `<|im_start|>{role}\\n{content}<|im_end|>\\n` per turn. Assistant
        turns keep their <think> block only after the last user turn (the final one shows an empty
        block if it has none); with thinking off, the generation prompt ends with an empty one."""
        if not self.has_chat:
            raise ValueError("this tokenizer has no <|im_start|>/<|im_end|> tokens, so no chat "
                             "format; give it a raw prompt instead")
        last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
        out = []
        for i, m in enumerate(messages):
            content, reasoning = m["content"], ""
            if m["role"] == "assistant" and "</think>" in content:
                reasoning = content.split("</think>")[0].split("<think>")[-1].strip("\n")
                content = content.split("</think>")[-1].lstrip("\n")
            if m["role"] == "assistant" and i > last_user and (reasoning or i == len(messages) - 1):
                content = f"<think>\n{reasoning}\n</think>\n\n{content}"
            out.append(f"<|im_start|>{m['role']}\n{content}<|im_end|>\n")
        if add_generation_prompt:
            empty_think = "" if enable_thinking else "<think>\n\n</think>\n\n"
            out.append("<|im_start|>assistant\n" + empty_think)
        return "".join(out)


def load_tokenizer(path_or_id: str | os.PathLike) -> Tokenizer:
    return Tokenizer(resolve(path_or_id))
