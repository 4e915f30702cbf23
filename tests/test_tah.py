"""Property tests of the TaH forward on tiny random models (CPU, fp32, eval mode).

What must hold for any configuration and any choice of who iterates:
- 2-D causality: outputs at position i never depend on tokens, or on iteration choices, after i;
  pass 1 never depends on pass 2 at all.
- the parallel forward equals token-by-token decoding through the per-depth KV cache;
- policy "standard" is exactly Qwen3; a LoRA whose B is zero changes pass 2 only through its input;
- a left-padded batch equals its rows run one by one;
- "always" and oracle policies give the passes they ask for, also with max_iter = 3.
"""
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import tah
from conftest import close



# ----------------------------------------------------------------------------- tiny random models


@dataclass(frozen=True)
class Setup:
    layers: int
    kv_heads: int
    groups: int
    head_dim: int
    hidden: int
    vocab: int
    tie: bool
    lora_r: int
    input_topk: int
    decider_topk: int
    decider_layers: tuple
    decider_dims: tuple
    max_iter: int
    seed: int


@st.composite
def setups(draw, max_iter=st.sampled_from([2, 3]), lora_r=st.sampled_from([1, 2, 4])):
    layers = draw(st.integers(1, 3))
    return Setup(
        layers=layers, kv_heads=draw(st.sampled_from([1, 2])), groups=draw(st.sampled_from([1, 2])),
        head_dim=draw(st.sampled_from([4, 8])), hidden=draw(st.sampled_from([16, 24])),
        vocab=draw(st.integers(24, 64)), tie=draw(st.booleans()), lora_r=draw(lora_r),
        input_topk=draw(st.integers(1, 6)), decider_topk=draw(st.integers(1, 6)),
        decider_layers=tuple(draw(st.lists(st.integers(0, layers), min_size=1, max_size=3, unique=True))),
        decider_dims=tuple(draw(st.sampled_from([[16], [16, 16], [16, 8], [8, 12, 12]]))),
        max_iter=draw(max_iter), seed=draw(st.integers(0, 2**16)))


def build(s: Setup, lora_r: int | None = None, decider: bool = True, lora_b: float = 0.2) -> tah.TaH:
    """A random model for a Setup; the same Setup always gives the same backbone weights.
    LoRA B gets random nonzero weights (std lora_b), so that pass 2 really differs."""
    c = tah.Qwen3Config(vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=2 * s.hidden,
                        num_hidden_layers=s.layers, num_attention_heads=s.kv_heads * s.groups,
                        num_key_value_heads=s.kv_heads, head_dim=s.head_dim, rope_theta=10_000.0,
                        max_position_embeddings=256, tie_word_embeddings=s.tie, torch_dtype="float32")
    r = s.lora_r if lora_r is None else lora_r
    t = tah.TaHConfig(max_iter=s.max_iter, input_topk=s.input_topk, lora_r=r, lora_alpha=2 * r,
                      decider_layers=list(s.decider_layers) if decider else None,
                      decider_topk=s.decider_topk, decider_dims=list(s.decider_dims))
    torch.manual_seed(s.seed)
    m = tah.TaH(c, t)
    m.init_weights(std=0.15)  # spread-out logits: near-ties in top-k become unlikely
    g = torch.Generator().manual_seed(s.seed + 1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):  # norms away from 1, so that they are tested too
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            if ".lora_B." in name:
                p.copy_(lora_b * torch.randn(p.shape, generator=g))
    return m.eval()


def same_backbone(src: tah.TaH, dst: tah.TaH) -> tah.TaH:
    """Copies every tensor dst has from src (dst lacks src's LoRA and/or decider)."""
    ours = src.state_dict()
    dst.load_state_dict({k: ours[k] for k in dst.state_dict()}, strict=True)
    return dst


def oracle(shape, max_iter, seed, p=None) -> torch.Tensor:
    """Random passes per token in 1..max_iter; p (if given) is the fraction that iterates."""
    g = torch.Generator().manual_seed(seed)
    if p is None:
        return torch.randint(1, max_iter + 1, shape, generator=g)
    iterate = torch.rand(shape, generator=g) < p
    return torch.where(iterate, torch.randint(2, max_iter + 1, shape, generator=g), 1)


def gap_threshold(probs: torch.Tensor) -> tuple[float, float]:
    """A threshold in the middle of the widest gap between the central continue probabilities,
    so that some tokens iterate, some do not, and rounding noise cannot flip a decision.
    Returns (threshold, distance to the nearest probability)."""
    p = torch.cat([torch.tensor([0.0, 1.0]), probs.flatten().float()]).sort().values
    gaps = p[1:] - p[:-1]
    n = len(gaps)
    lo, hi = n // 4, max(n // 4 + 1, n - n // 4)
    j = lo + int(gaps[lo:hi].argmax())
    return float(p[j] + gaps[j] / 2), float(gaps[j] / 2)



def decider_threshold(m, ids, valid=None):
    """A gap threshold for the pass-1 continue probabilities of ids (at valid positions)."""
    with torch.no_grad():
        c = m(ids, "standard", valid=valid).continue_logit
    probs = torch.sigmoid(c) if valid is None else torch.sigmoid(c)[valid]
    thr, margin = gap_threshold(probs)
    assume(margin > 1e-4)
    return thr


# ----------------------------------------------------------------------------- duo-causal mask


@given(q=st.lists(st.tuples(st.integers(0, 6), st.integers(1, 3)), min_size=1, max_size=8),
       k=st.lists(st.tuples(st.integers(0, 6), st.integers(1, 3)), min_size=1, max_size=8))
def test_duo_causal_mask_is_the_rule(q, k):
    qp, qd = torch.tensor([p for p, _ in q]), torch.tensor([d for _, d in q])
    kp, kd = torch.tensor([p for p, _ in k]), torch.tensor([d for _, d in k])
    mask = tah.duo_causal_mask(qp[:, None], qd[:, None], kp[None], kd[None])
    brute = [[j <= i and e <= d for (j, e) in k] for (i, d) in q]
    assert mask.tolist() == brute
    for d in (1, 2, 3):  # the forward passes the query depth as a plain int
        assert tah.duo_causal_mask(qp[:, None], d, kp[None], kd[None]).tolist() == \
            [[j <= i and e <= d for (j, e) in k] for (i, _) in q]


def test_duo_causal_mask_worked_example():
    # positions 0..4, positions 1 and 3 iterate: keys are pass-1 entries 0..4, pass-2 entries 1, 3
    kp, kd = torch.tensor([0, 1, 2, 3, 4, 1, 3]), torch.tensor([1, 1, 1, 1, 1, 2, 2])
    assert tah.duo_causal_mask(torch.tensor(3), 2, kp, kd).tolist() == [1, 1, 1, 1, 0, 1, 1]
    assert tah.duo_causal_mask(torch.tensor(4), 1, kp, kd).tolist() == [1, 1, 1, 1, 1, 0, 0]


@given(st.integers(0, 2**16), st.integers(1, 6), st.integers(1, 10), st.sampled_from([1, 2, 4]))
def test_attention_reference_matches_sdpa(seed, T, S, groups):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 2 * groups, T, 8, generator=g)
    k, v = torch.randn(2, 2, S, 8, generator=g), torch.randn(2, 2, S, 8, generator=g)
    mask = torch.rand(2, T, S, generator=g) < 0.6
    mask[..., 0] = True  # every query sees something, as in the forward
    fast = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], enable_gqa=True)
    close(tah.attention_reference(q, k, v, mask[:, None]), fast)


# ----------------------------------------------------------------------------- 2-D causality


@pytest.mark.parametrize("kind", ["oracle", "decider"])
@settings(max_examples=4)
@given(s=setups(), B=st.integers(1, 2), T=st.integers(2, 9), cut=st.floats(0, 1))
@torch.no_grad()
def test_causality(kind, s, B, T, cut):
    """Tokens and iteration choices after position i change nothing at positions <= i."""
    m = build(s)
    i = min(int(cut * T), T - 2)  # change positions i+1..T-1
    g = torch.Generator().manual_seed(s.seed)
    ids = torch.randint(0, s.vocab, (B, T), generator=g)
    ids2 = ids.clone()
    ids2[:, i + 1:] = torch.randint(0, s.vocab, (B, T - i - 1), generator=g)
    if kind == "decider":
        thr = decider_threshold(m, ids)
        a, b = m(ids, "decider", threshold=thr), m(ids2, "decider", threshold=thr)
        close(a.continue_logit[:, :i + 1], b.continue_logit[:, :i + 1])
    else:
        P = oracle((B, T), s.max_iter, s.seed)
        P2 = P.clone()
        P2[:, i + 1:] = oracle((B, T - i - 1), s.max_iter, s.seed + 7)
        a, b = m(ids, P), m(ids2, P2)
        c = m(ids, P2)  # only the choices change
        close(a.logits[:, :i + 1], c.logits[:, :i + 1])
        assert torch.equal(a.iter_count[:, :i + 1], c.iter_count[:, :i + 1])
    close(a.logits[:, :i + 1], b.logits[:, :i + 1])
    assert torch.equal(a.iter_count[:, :i + 1], b.iter_count[:, :i + 1])


@settings(max_examples=6)
@given(s=setups(), T=st.integers(1, 9))
@torch.no_grad()
def test_pass_two_never_changes_pass_one(s, T):
    """Pass-1 hidden states and the decider's logit are identical under every policy; tokens
    that do not iterate get exactly the pass-1 logits; tokens that do get something else."""
    m = build(s)
    ids = torch.randint(0, s.vocab, (2, T), generator=torch.Generator().manual_seed(s.seed))
    std = m(ids, "standard", output_hidden_states=True)
    assert len(std.hidden_states) == s.layers + 1
    for policy in ("always", "decider", oracle((2, T), s.max_iter, s.seed)):
        for thr in (0.2, 0.5, 0.8):
            out = m(ids, policy, threshold=thr, output_hidden_states=True)
            for h1, h2 in zip(std.hidden_states, out.hidden_states):
                assert torch.equal(h1, h2)
            if isinstance(policy, str):
                assert torch.equal(out.continue_logit, std.continue_logit)
            once = out.iter_count == 1
            assert torch.equal(out.logits[once], std.logits[once])
            assert ((out.logits[~once] - std.logits[~once]).abs().amax(-1) > 1e-3).all()


# ----------------------------------------------------------------------------- parallel == sequential


@pytest.mark.parametrize("kind", ["oracle", "decider"])
@settings(max_examples=5)
@given(s=setups(), B=st.integers(1, 2), T=st.integers(1, 10), pre=st.floats(0, 1), p=st.floats(0, 1))
@torch.no_grad()
def test_parallel_equals_cached_decoding(kind, s, B, T, pre, p):
    """A prefill of the first n tokens, then one token at a time through tah.KVCache, gives the
    logits and passes of one parallel forward over all tokens."""
    m = build(s)
    ids = torch.randint(0, s.vocab, (B, T), generator=torch.Generator().manual_seed(s.seed))
    if kind == "decider":
        thr = decider_threshold(m, ids)
        policy = lambda a, b: "decider"  # noqa: E731
    else:
        thr, P = None, oracle((B, T), s.max_iter, s.seed, p=p)
        policy = lambda a, b: P[:, a:b]  # noqa: E731
    full = m(ids, policy(0, T), threshold=thr)
    cache = tah.KVCache(m, B, T)
    n = int(pre * (T - 1))
    logits, counts = [], []
    if n:
        out = m(ids[:, :n], policy(0, n), cache=cache, threshold=thr)
        logits.append(out.logits), counts.append(out.iter_count)
    for t in range(n, T):
        out = m(ids[:, t:t + 1], policy(t, t + 1), positions=torch.full((B, 1), t), cache=cache,
                start=t, threshold=thr)
        logits.append(out.logits), counts.append(out.iter_count)
    assert torch.equal(torch.cat(counts, 1), full.iter_count)
    close(torch.cat(logits, 1), full.logits)


# ----------------------------------------------------------------------------- standard, LoRA, padding


@settings(max_examples=5)
@given(s=setups(), T=st.integers(1, 9))
@torch.no_grad()
def test_standard_is_plain_qwen3(s, T):
    m = build(s)
    plain = same_backbone(m, tah.TaH(m.config, tah.TaHConfig(lora_r=0)))
    ids = torch.randint(0, s.vocab, (2, T), generator=torch.Generator().manual_seed(s.seed))
    a, b = m(ids, "standard"), plain(ids, "standard")
    assert torch.equal(a.logits, b.logits)
    assert torch.equal(a.iter_count, torch.ones_like(ids)) and torch.equal(b.iter_count, a.iter_count)


@settings(max_examples=5)
@given(s=setups(), T=st.integers(1, 9))
@torch.no_grad()
def test_zero_lora_changes_pass_two_only_through_its_input(s, T):
    """With B = 0 the adapter is a no-op: pass 2 is the LoRA-free layers on the soft token.
    With B != 0 the iterated tokens' logits move."""
    zero = build(s, lora_b=0.0)
    nolora = same_backbone(zero, tah.TaH(zero.config, tah.TaHConfig(
        max_iter=s.max_iter, input_topk=s.input_topk, lora_r=0)))
    ids = torch.randint(0, s.vocab, (2, T), generator=torch.Generator().manual_seed(s.seed))
    for policy in ("always", oracle((2, T), s.max_iter, s.seed)):
        a, b = zero(ids, policy), nolora(ids, policy)
        close(a.logits, b.logits, atol=1e-6)
        assert torch.equal(a.iter_count, b.iter_count)
    live = build(s)
    c = live(ids, "always")
    assert (c.logits - nolora(ids, "always").logits).abs().amax(-1).min() > 1e-4


@pytest.mark.parametrize("kind", ["oracle", "decider"])
@settings(max_examples=4)
@given(s=setups(), lengths=st.lists(st.integers(1, 8), min_size=2, max_size=3))
@torch.no_grad()
def test_left_padded_batch_equals_rows(kind, s, lengths):
    m = build(s)
    B, T = len(lengths), max(lengths)
    g = torch.Generator().manual_seed(s.seed)
    ids = torch.randint(0, s.vocab, (B, T), generator=g)  # padding slots hold random tokens
    valid = torch.arange(T)[None] >= T - torch.tensor(lengths)[:, None]  # left padding
    if kind == "decider":
        thr = decider_threshold(m, ids, valid)
        P = None
        out = m(ids, "decider", valid=valid, threshold=thr)
    else:
        thr, P = None, oracle((B, T), s.max_iter, s.seed)
        out = m(ids, P, valid=valid)
    assert torch.equal(out.iter_count[~valid], torch.zeros_like(ids[~valid]))
    for r, n in enumerate(lengths):
        row = m(ids[r:r + 1, T - n:], "decider" if P is None else P[r:r + 1, T - n:], threshold=thr)
        assert torch.equal(out.iter_count[r, T - n:], row.iter_count[0])
        close(out.logits[r, T - n:], row.logits[0])



@pytest.mark.parametrize("kind", ["oracle", "decider"])
@settings(max_examples=4)
@given(s=setups(max_iter=st.just(2)), B=st.integers(1, 3), T=st.integers(2, 9))
@torch.no_grad()
def test_last_logits_without_full_logits(kind, s, B, T):
    """logits="last" (what prefill uses: no (B, T, V) tensor, the top-k in chunks) gives the last
    row, the passes and the decider's logits of the full forward."""
    m = build(s)
    ids = torch.randint(0, s.vocab, (B, T), generator=torch.Generator().manual_seed(s.seed))
    valid = torch.arange(T)[None] >= torch.arange(B)[:, None]  # row r has r pads on the left
    thr = decider_threshold(m, ids, valid) if kind == "decider" else None
    policy = "decider" if kind == "decider" else oracle((B, T), 2, s.seed)
    full = m(ids, policy, valid=valid, threshold=thr)
    last = m(ids, policy, valid=valid, threshold=thr, logits="last")
    assert torch.equal(last.iter_count, full.iter_count)
    close(last.logits, full.logits[:, -1:])
    if kind == "decider":
        close(last.continue_logit, full.continue_logit)
    h = torch.randn(B, T, s.hidden)
    k = min(3, s.vocab)
    chunked = m.head_topk(h, k, chunk=4)  # the head on 4 rows at a time
    whole = m.lm_head(h).topk(k, dim=-1)
    assert torch.equal(chunked[1], whole.indices)
    close(chunked[0], whole.values)

# ----------------------------------------------------------------------------- passes asked for


@settings(max_examples=4)
@given(s=setups(), T=st.integers(1, 8))
@torch.no_grad()
def test_always_iterates_every_token(s, T):
    m = build(s)
    ids = torch.randint(0, s.vocab, (2, T), generator=torch.Generator().manual_seed(s.seed))
    out = m(ids, "always")
    assert torch.equal(out.iter_count, torch.full_like(ids, s.max_iter))
    full = m(ids, torch.full_like(ids, s.max_iter))  # the same as an oracle asking max_iter
    close(out.logits, full.logits)


@settings(max_examples=4)
@given(s=setups(max_iter=st.just(3)), T=st.integers(2, 9))
@torch.no_grad()
def test_three_passes(s, T):
    """max_iter = 3: the passes are those asked for, a third pass changes the logits of its
    token, and only those of its token and the later ones."""
    m = build(s)
    g = torch.Generator().manual_seed(s.seed)
    ids = torch.randint(0, s.vocab, (2, T), generator=g)
    P = torch.randint(1, 4, (2, T), generator=g)
    P[0, T // 2] = 3
    out = m(ids, P)
    assert torch.equal(out.iter_count, P)
    two = m(ids, P.clamp(max=2))
    first = int((P[0] == 3).nonzero()[0])
    close(out.logits[0, :first], two.logits[0, :first])
    assert (out.logits[0, first] - two.logits[0, first]).abs().max() > 1e-3


def test_nonuniform_decider_dims(tmp_path):
    s = Setup(layers=2, kv_heads=2, groups=2, head_dim=8, hidden=16, vocab=40, tie=False, lora_r=2,
              input_topk=4, decider_topk=4, decider_layers=(0, 2), decider_dims=(16, 8), max_iter=2, seed=3)
    m = build(s)
    state = m.state_dict()
    assert state["decider.backbone.blocks.0.dim_change.weight"].shape == (8, 16)
    assert not any(k.startswith("decider.backbone.blocks.1.dim_change") for k in state)
    ids = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = m(ids, "decider", threshold=0.5, output_hidden_states=True)
        hand = m.decider({i: out.hidden_states[i] for i in (0, 2)}, m(ids, "standard").logits)
    assert torch.equal(out.continue_logit, hand) and torch.isfinite(hand).all()
    assert torch.equal(out.iter_count, 1 + (torch.sigmoid(hand) > 0.5).long())
    tah.save(m, tmp_path / "m")
    again = tah.load(tmp_path / "m")
    assert again.tah.decider_dims == [16, 8]
    with torch.no_grad():
        assert torch.equal(again(ids, "decider", threshold=0.5).logits, out.logits)


def test_fresh_adapter_and_decider_on_a_plain_checkpoint(tmp_path):
    """add_parts(load(plain Qwen3 dir), ...) adds a LoRA with B = 0 and a decider: "standard" is
    the plain model, and pass 2 is the LoRA-free layers on the soft token. The loaded model's
    weights are shared, not copied; load alone reads exactly what is on disk."""
    s = Setup(layers=2, kv_heads=1, groups=4, head_dim=8, hidden=24, vocab=48, tie=True, lora_r=4,
              input_topk=5, decider_topk=5, decider_layers=(1,), decider_dims=(8,), max_iter=2, seed=5)
    src = build(s)
    plain = same_backbone(src, tah.TaH(src.config))  # TaHConfig(lora_r=0): saved as plain Qwen3
    tah.save(plain, tmp_path / "plain")
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == ["config.json", "model.safetensors"]
    t = tah.TaHConfig(input_topk=5, lora_r=4, decider_layers=[1], decider_topk=5, decider_dims=[8])
    loaded = tah.load(tmp_path / "plain")
    assert loaded.tah == tah.TaHConfig(lora_r=0) and loaded.decider is None
    fresh = tah.add_parts(loaded, t)
    assert fresh.model.embed_tokens.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert fresh.decider.combined_projection.weight.dtype == torch.float32
    nolora = same_backbone(src, tah.TaH(src.config, tah.TaHConfig(input_topk=5, lora_r=0)))
    ids = torch.randint(0, 48, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(fresh(ids, "standard").logits, plain(ids, "standard").logits)
        close(fresh(ids, "always").logits, nolora(ids, "always").logits, atol=1e-6)
        assert torch.isfinite(fresh(ids, "decider").continue_logit).all()
    assert all(m.lora_B.weight.abs().sum() == 0 for m in fresh.modules()
               if isinstance(m, tah.LoRALinear))


@pytest.mark.parametrize("max_iter", [2, 3])
def test_backward_reaches_what_ran(max_iter):
    """Gradients flow through pass 2 (LoRA, soft token) only when someone iterates, and the
    decider's logit trains the decider."""
    s = Setup(layers=2, kv_heads=2, groups=2, head_dim=8, hidden=16, vocab=40, tie=False, lora_r=2,
              input_topk=4, decider_topk=4, decider_layers=(0, 2), decider_dims=(16,), max_iter=max_iter, seed=9)
    m = build(s)
    for mod in m.modules():  # train mode without randomness
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    m.train()
    ids = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(1))
    lora_b = m.model.layers[0].mlp.down_proj.lora_B.weight
    for policy, iterates in (("standard", False), ("always", True), (oracle((2, 6), max_iter, 2), True)):
        m.zero_grad()
        out = m(ids, policy)
        (out.logits.logsumexp(-1).sum() + out.continue_logit.sum() if isinstance(policy, str)
         else out.logits.logsumexp(-1).sum()).backward()
        assert (lora_b.grad is not None and lora_b.grad.abs().sum() > 0) == iterates
        assert m.model.embed_tokens.weight.grad.abs().sum() > 0
        if isinstance(policy, str):
            assert m.decider.combined_projection.weight.grad.abs().sum() > 0


def test_a_plain_qwen3_runs_with_the_default_policy(tmp_path):
    """Without a decider the default policy is "standard": forward and generate just run and
    give the Qwen3 logits; asking for "decider" explicitly stays a clear error."""
    s = Setup(layers=2, kv_heads=1, groups=2, head_dim=8, hidden=16, vocab=40, tie=False, lora_r=0,
              input_topk=5, decider_topk=5, decider_layers=(), decider_dims=(8,), max_iter=2,
              seed=3)
    src = build(s, decider=False)
    tah.save(same_backbone(src, tah.TaH(src.config)), tmp_path / "qwen")
    model = tah.load(tmp_path / "qwen")
    ids = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(ids)
        assert torch.equal(out.logits, model(ids, "standard").logits)
        assert (out.iter_count == 1).all() and out.continue_logit is None
        steps = list(tah.generate(model, ids[:1], 4))
        greedy = ids[:1]
        for tok, passes in steps:  # the same tokens as argmax over full forwards, one pass each
            assert int(passes) == 1
            assert int(tok) == int(model(greedy, "standard").logits[0, -1].argmax())
            greedy = torch.cat([greedy, tok[:, None]], 1)
    with pytest.raises(ValueError, match="'decider' with a model that has one"):
        model(ids, "decider")


def test_hard_first_packs_each_rows_actives_in_order():
    active = torch.tensor([[False, True, False, True, False],
                           [True, False, False, False, False],
                           [False, False, False, False, False]])
    idx, q_valid = tah.hard_first(active)
    assert idx[0].tolist() == [1, 3] and idx[1, 0] == 0 and q_valid.tolist() == \
        [[True, True], [True, False], [False, False]]
    assert (active.gather(1, idx) == q_valid).all()


def test_add_logit_residual_adds_where_a_token_got_the_pass_only():
    """z_d = lm_head(h_d) joins z1 at the positions of the window whose iter_count reaches d."""
    c = tah.Qwen3Config(vocab_size=3, hidden_size=3, intermediate_size=6, num_hidden_layers=1,
                        num_attention_heads=1, num_key_value_heads=1, head_dim=4,
                        tie_word_embeddings=False)
    m = tah.TaH(c)
    with torch.no_grad():
        m.lm_head.weight.copy_(torch.eye(3))  # z_d = h_d: what is added is plain to see
    h2 = torch.arange(24.0).view(2, 4, 3) + 1
    iter_count = torch.tensor([[1, 2, 1, 2], [2, 2, 1, 0]])
    out = tah.Output(None, iter_count, [torch.zeros(2, 4, 3), h2])
    z = m.add_logit_residual(torch.zeros(2, 2, 3), out, start=1)  # the window of positions 1, 2
    assert torch.equal(z, torch.stack([h2[0, 1:3] * torch.tensor([[1.0], [0.0]]),
                                       h2[1, 1:3] * torch.tensor([[1.0], [0.0]])]))
    assert torch.equal(m.final_logits(out), h2 * (iter_count >= 2)[..., None])


def test_decider_initialisation_is_the_authors():
    """Backbone Linears Kaiming-normal (std sqrt(2 / fan_in), within 10%) with zero biases."""
    c = tah.Qwen3Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    torch.manual_seed(0)
    d = tah.Decider(c, tah.TaHConfig(decider_layers=[0, 1], decider_dims=[256] * 2, decider_topk=8))
    d.reset_parameters()
    linears = [m for m in d.backbone.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 6  # input projection, 2 x (2 block MLP Linears), output layer
    for m in linears:
        want = (2 / m.weight.shape[1]) ** 0.5
        assert abs(m.weight.std().item() / want - 1) < 0.1 and not m.bias.any()
    bound = 1 / 8 ** 0.5  # the projections keep nn.Linear's default uniform(+-1/sqrt(fan_in))
    assert d.logits_projection.weight.abs().max() <= bound and d.logits_projection.bias.any()


def test_gradient_checkpointing_gives_the_same_gradients():
    """Recomputing the layers in backward (train.py turns it on for real models) stores each
    depth's keys again under the same (layer, depth) in `tah.Keys`: same loss, same gradients."""
    s = Setup(layers=2, kv_heads=2, groups=2, head_dim=8, hidden=16, vocab=40, tie=True, lora_r=2,
              input_topk=4, decider_topk=4, decider_layers=(0,), decider_dims=(16,), max_iter=3,
              seed=3)
    ids = torch.randint(0, s.vocab, (2, 7), generator=torch.Generator().manual_seed(0))
    passes = oracle((2, 7), 3, seed=1)
    grads = []
    for checkpointing in (False, True):
        m = build(s, decider=False).train()
        for module in m.modules():  # dropout off: both runs must see the same numbers
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        m.grad_checkpointing = checkpointing
        m(ids, passes).logits.logsumexp(-1).sum().backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any(".lora_B." in n for n in grads[0])
    for name in grads[0]:
        close(grads[1][name], grads[0][name], atol=1e-5)
