"""The Qwen3 core of tah.py against `transformers`, plus loading, caching, errors and the tokenizer.

Every model here is a tiny random Qwen3 written by `transformers`' own `save_pretrained`, so the
loader reads exactly the files a real checkpoint has. `policy="standard"` runs no second pass:
that is plain Qwen3, and it must match `Qwen3ForCausalLM` in float32.
"""
import json
import shutil

import huggingface_hub.constants
import pytest
import safetensors
import torch
import torch.nn.functional as F
from conftest import FIXTURE
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import tah

transformers = pytest.importorskip("transformers")


# ----------------------------------------------------------------------------- helpers


@st.composite
def qwen3_configs(draw) -> dict:
    """Tiny Qwen3 shapes: GQA ratios 1-3, head_dim independent of hidden/heads, odd vocabs."""
    kv = draw(st.sampled_from([1, 2, 4]))
    heads = kv * draw(st.integers(1, 3))
    return dict(vocab_size=draw(st.integers(40, 300)), hidden_size=draw(st.integers(4, 32)) * 2,
                intermediate_size=draw(st.integers(8, 96)), num_hidden_layers=draw(st.integers(1, 2)),
                num_attention_heads=heads, num_key_value_heads=kv,
                head_dim=draw(st.sampled_from([4, 6, 8, 12, 16])),
                tie_word_embeddings=draw(st.booleans()),
                rope_theta=draw(st.sampled_from([100.0, 10_000.0, 1_000_000.0])),
                rms_norm_eps=draw(st.sampled_from([1e-6, 1e-5])), max_position_embeddings=64)


def make_hf(cfg: dict, seed: int = 0):
    """A transformers Qwen3 with every weight random, norm scales included (a loader that
    dropped a norm weight would still pass with the default all-ones scales)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    config = Qwen3Config(**cfg, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:  # RMSNorm scales
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:  # std 0.15 spreads the logits so that greedy decoding has no near-ties
                p.normal_(0.0, 0.15)
    return model


def saved(model, path, **kwargs):
    model.save_pretrained(path, **kwargs)
    return path


def assert_close(ours: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-5):
    """Agreement relative to the reference's scale: max |ours - ref| <= rtol * max |ref|."""
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    err, scale = (ours - ref).abs().max().item(), ref.abs().max().item()
    assert err <= rtol * scale, f"max abs diff {err:.3g} > {rtol} * {scale:.3g}"


TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False,
            rope_theta=10_000.0, rms_norm_eps=1e-6, max_position_embeddings=64)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread; on a busy machine it makes each small matmul
    wait for a free core (this file ran 3-5x slower with 2 threads on a shared 2-core box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_hf():
    return make_hf(TINY)


@pytest.fixture
def tiny_dir(tiny_hf, tmp_path):
    return saved(tiny_hf, tmp_path / "tiny")


# ----------------------------------------------------------------------------- parity with transformers


@settings(max_examples=6)
@given(cfg=qwen3_configs(), seed=st.integers(0, 2**16), T=st.integers(1, 12), older_form=st.booleans())
def test_logits_and_greedy_match_transformers(tmp_path_factory, cfg, seed, T, older_form):
    hf = make_hf(cfg, seed)
    d = saved(hf, tmp_path_factory.mktemp("hf"))
    if older_form:  # config.json as transformers 4.x wrote it: top-level rope_theta and torch_dtype
        j = json.loads((d / "config.json").read_text())
        rope = j.pop("rope_parameters", None) or {"rope_theta": j["rope_theta"]}
        j |= {"rope_theta": rope["rope_theta"], "torch_dtype": j.pop("dtype", "float32")}
        (d / "config.json").write_text(json.dumps(j))
    model = tah.load(d)
    assert model.config.rope_theta == cfg["rope_theta"]
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    assert tied == cfg["tie_word_embeddings"]
    ids = torch.randint(0, cfg["vocab_size"], (2, T), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        assert_close(model(ids, "standard").logits, hf(ids).logits)
        want = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, min_new_tokens=20,
                           do_sample=False, eos_token_id=None, pad_token_id=0)[:, T:]
    got = torch.stack([tok for tok, _ in tah.generate(model, ids, 20, policy="standard", temperature=0.0)], 1)
    assert got.shape == (2, 20)
    assert torch.equal(got, want)


# ----------------------------------------------------------------------------- config


# Qwen/Qwen3-0.6B's config.json, key for key.
QWEN3_0_6B = {
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 1024, "initializer_range": 0.02, "intermediate_size": 3072,
    "max_position_embeddings": 40960, "max_window_layers": 28, "model_type": "qwen3",
    "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.51.0",
    "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
}


def test_qwen3_0_6b_config_shapes_and_parameter_count():
    cfg = tah.qwen3_config(QWEN3_0_6B)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (1024, 3072, 28)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (16, 8, 128)
    assert (cfg.vocab_size, cfg.max_position_embeddings) == (151936, 40960)
    assert cfg.rope_theta == 1_000_000 and cfg.rms_norm_eps == 1e-6
    assert cfg.tie_word_embeddings is True and cfg.torch_dtype == "bfloat16"
    with torch.device("meta"):
        model = tah.TaH(cfg)
    # head_dim 128 is not 1024 / 16: queries are 2048 wide, keys/values 1024
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (2048, 1024) and attn.k_proj.weight.shape == (1024, 1024)
    assert attn.o_proj.weight.shape == (1024, 2048) and attn.q_norm.weight.shape == (128,)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert sum(p.numel() for p in model.parameters()) == 596_049_920  # tied matrix counted once


def test_rope_parameters_form_gives_the_same_theta():
    newer = {k: v for k, v in QWEN3_0_6B.items() if k not in ("rope_theta", "rope_scaling", "torch_dtype")}
    newer |= {"rope_parameters": {"rope_theta": 1000000, "rope_type": "default"}, "dtype": "bfloat16"}
    assert tah.qwen3_config(newer) == tah.qwen3_config(QWEN3_0_6B)
    assert tah.qwen3_config(newer | {"rope_parameters": {"rope_theta": 5e5}}).rope_theta == 5e5


# ----------------------------------------------------------------------------- loading


def test_sharded_checkpoint_loads_and_matches(tiny_hf, tmp_path):
    d = saved(tiny_hf, tmp_path / "sharded", max_shard_size="20KB")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2 and not (d / "model.safetensors").exists()
    ids = torch.randint(0, TINY["vocab_size"], (1, 9))
    with torch.no_grad():
        assert_close(tah.load(d)(ids, "standard").logits, tiny_hf(ids).logits)


def test_bf16_file_loads_into_the_requested_dtype(tmp_path):
    d = saved(make_hf(TINY, seed=3).to(torch.bfloat16), tmp_path / "bf16")
    assert json.loads((d / "config.json").read_text()).get("dtype", "bfloat16") == "bfloat16"
    stored = load_file(d / "model.safetensors")
    assert all(v.dtype == torch.bfloat16 for v in stored.values())
    for dtype in (torch.float32, torch.bfloat16):
        model = tah.load(d, dtype=dtype)
        state = model.state_dict()
        for k, v in stored.items():
            assert state[k].dtype == dtype, k
            assert torch.equal(state[k], v.to(dtype)), k  # bf16 -> fp32 is exact
    assert tah.load(d).lm_head.weight.dtype == torch.float32  # default on the CPU


def test_load_reads_into_the_model_without_a_second_copy(tiny_dir, monkeypatch):
    """The model is built on the meta device and the tensors safetensors returns become the
    parameters themselves (or, where one sits at an unaligned address, a copy of that one
    tensor): no real-storage initialisation, no copy into a preallocated model."""
    read = set()  # storages of every tensor the loader got from safetensors
    unaligned = []  # whether each of them sits at an address that is not a multiple of 64
    real_safe_open = safetensors.safe_open  # tah.py holds its own reference

    class Recording:
        def __init__(self, *args, **kwargs):
            self.f = real_safe_open(*args, **kwargs)

        def __enter__(self):
            self.h = self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def keys(self):
            return self.h.keys()

        def get_tensor(self, name):
            t = self.h.get_tensor(name)
            read.add(t.untyped_storage().data_ptr())
            unaligned.append(t.data_ptr() % 64 != 0)
            return t

    inits = []
    real_init = tah.TaH.init_weights

    def init_weights(self, *args, **kwargs):
        inits.append(any(not p.is_meta for p in self.parameters()))
        return real_init(self, *args, **kwargs)

    monkeypatch.setattr(tah, "safe_open", Recording)
    monkeypatch.setattr(tah.TaH, "init_weights", init_weights)
    model = tah.load(tiny_dir, dtype=torch.float32)
    assert inits == [False]  # initialised once, on meta (no memory), never on real storage
    params = list(model.parameters())
    assert params and not any(p.is_meta for p in params)
    stored = load_file(tiny_dir / "model.safetensors")
    assert len(read) == len(stored)
    copied = [n for n, p in model.named_parameters() if p.untyped_storage().data_ptr() not in read]
    assert len(copied) <= sum(unaligned)  # only the unaligned ones are copied
    for name, p in model.named_parameters():
        assert p.data_ptr() % 64 == 0 and torch.equal(p, stored[name]), name


# ----------------------------------------------------------------------------- cached decoding


@settings(max_examples=6)
@given(cfg=qwen3_configs(), seed=st.integers(0, 2**16), T=st.integers(2, 10), data=st.data())
def test_cached_decode_equals_full_forward(cfg, seed, T, data):
    torch.manual_seed(seed)
    model = tah.TaH(tah.qwen3_config(cfg)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(1.0 if p.dim() == 1 else 0.0, 0.15)
    B, prefill = 2, data.draw(st.integers(0, T - 1))
    ids = torch.randint(0, cfg["vocab_size"], (B, T))
    cache = tah.KVCache(model, B, T + 3)  # spare slots must stay unseen
    with torch.no_grad():
        full = model(ids, "standard").logits
        steps = [model(ids[:, :prefill], "standard", positions=torch.arange(prefill).expand(B, -1),
                       cache=cache, start=0).logits] if prefill else []
        for t in range(prefill, T):
            out = model(ids[:, t:t + 1], "standard", positions=torch.full((B, 1), t), cache=cache, start=t)
            assert_close(out.logits[:, 0], full[:, t])
            steps.append(out.logits)
    assert_close(torch.cat(steps, 1), full)


# ----------------------------------------------------------------------------- bad input


def _edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(cfg | changes))


def _edit_weights(d, edit):
    state = load_file(d / "model.safetensors")
    edit(state)
    save_file(state, d / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("changes, match", [
    ({"model_type": "llama"}, "model_type.*llama.*qwen3"),
    ({"hidden_size": -64}, r"hidden_size is -64; it must be int in \[1, "),
    ({"num_key_value_heads": 3}, "multiple of num_key_value_heads"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "scaled RoPE"),
])
def test_bad_config_values(tiny_dir, changes, match):
    _edit_config(tiny_dir, **changes)
    with pytest.raises(ValueError, match=match):
        tah.load(tiny_dir)


def test_config_that_is_not_json(tiny_dir):
    (tiny_dir / "config.json").write_text('{"model_type": "qwen3", hidden_size: 64')
    with pytest.raises(ValueError, match=r"config\.json: Expecting property name"):
        tah.load(tiny_dir)


def test_missing_weight(tiny_dir):
    _edit_weights(tiny_dir, lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r'Missing key\(s\) in state_dict: "model.layers.1.mlp.up_proj.weight"'):
        tah.load(tiny_dir)


def test_unexpected_weight(tiny_dir):
    _edit_weights(tiny_dir, lambda s: s.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(32)}))
    with pytest.raises(ValueError, match=r'Unexpected key\(s\) in state_dict: "model.layers.0.self_attn.q_proj.bias"'):
        tah.load(tiny_dir)


def test_wrong_shape_names_the_tensor(tiny_dir):
    _edit_weights(tiny_dir, lambda s: s.update({"model.layers.0.self_attn.k_norm.weight": torch.ones(9)}))
    with pytest.raises(ValueError, match=r"size mismatch for model.layers.0.self_attn.k_norm.weight: .*\[9\].*\[8\]"):
        tah.load(tiny_dir)


def test_pickle_weights_are_refused_unopened(tiny_hf, tiny_dir, monkeypatch):
    (tiny_dir / "model.safetensors").unlink()
    torch.save(tiny_hf.state_dict(), tiny_dir / "pytorch_model.bin")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("tah.load unpickled a file"))
    with pytest.raises(ValueError, match=r"only as pickles.*safetensors"):
        tah.load(tiny_dir)


def test_missing_shard(tiny_hf, tmp_path):
    d = saved(tiny_hf, tmp_path / "sharded", max_shard_size="20KB")
    gone = sorted(set(json.loads((d / "model.safetensors.index.json").read_text())["weight_map"].values()))[1]
    (d / gone).unlink()
    with pytest.raises(FileNotFoundError, match=f"{gone} is missing"):
        tah.load(d)


def test_hub_id_while_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # nothing cached
    monkeypatch.chdir(tmp_path)  # so that no local folder is called Qwen/...
    with pytest.raises(OSError, match=r"Qwen/Qwen3-0\.6B.*local-dir.*directory"):
        tah.load("Qwen/Qwen3-0.6B")


def test_prompt_at_or_over_the_context(tiny_dir):
    _edit_config(tiny_dir, max_position_embeddings=16)
    model = tah.load(tiny_dir)
    for T in (16, 17):
        with pytest.raises(ValueError, match=f"prompt has {T} tokens but the model's context is 16"):
            next(tah.generate(model, torch.zeros(1, T, dtype=torch.long), 4, policy="standard"))
    # one below the limit still generates; prompt + new tokens never exceed the context
    got = list(tah.generate(model, torch.zeros(1, 15, dtype=torch.long), 4, policy="standard"))
    assert len(got) == 1


# ----------------------------------------------------------------------------- attention


@given(seed=st.integers(0, 2**16), B=st.integers(1, 2), G=st.sampled_from([1, 2, 4]),
       ratio=st.integers(1, 3), T=st.integers(1, 7), S=st.integers(1, 9), K=st.sampled_from([4, 8]))
def test_attention_reference_equals_sdpa(seed, B, G, ratio, T, S, K):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, n, t, K, generator=g) for n, t in ((G * ratio, T), (G, S), (G, S)))
    mask = torch.rand(B, 1, T, S, generator=g) < 0.5
    mask[torch.arange(B)[:, None], 0, torch.arange(T), torch.randint(0, S, (B, T), generator=g)] = True
    ref = tah.attention_reference(q, k, v, mask)
    fast = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert ref.shape == (B, G * ratio, T, K)
    torch.testing.assert_close(ref, fast, atol=1e-5, rtol=1e-5)
    # a masked-out key really is ignored: changing its value changes nothing
    v2 = v.masked_fill(~mask[:, :, :1].transpose(-1, -2), 1e3)  # keys row 0 of queries cannot see
    torch.testing.assert_close(tah.attention_reference(q[:, :, :1], k, v2, mask[:, :, :1]), ref[:, :, :1])


# ----------------------------------------------------------------------------- tokenizer and chat format


@pytest.fixture(scope="module")
def tok():
    return tah.load_tokenizer(FIXTURE)


def test_special_tokens_are_looked_up_by_string(tok):
    added = {t["content"]: t["id"] for t in json.loads((FIXTURE / "tokenizer.json").read_text())["added_tokens"]}
    assert (tok.im_start, tok.im_end) == (added["<|im_start|>"], added["<|im_end|>"])
    assert (tok.think, tok.end_think) == (added["<think>"], added["</think>"])
    assert tok.has_chat
    assert tok.stop_ids == sorted({added["<|im_end|>"], added["<|endoftext|>"]})  # eos is <|im_end|>
    ids = tok.encode("<|im_start|>user\n2+2?<|im_end|>\n<think>\n</think>")
    assert ids[0] == tok.im_start and tok.im_end in ids and ids[-1] == tok.end_think and tok.think in ids
    assert tok.decode(ids) == "<|im_start|>user\n2+2?<|im_end|>\n<think>\n</think>"


# The strings Qwen3's chat template produces (Qwen/Qwen3-0.6B tokenizer_config.json), written out:
#   every turn        "<|im_start|>{role}\n{content}<|im_end|>\n"
#   generation prompt "<|im_start|>assistant\n", plus "<think>\n\n</think>\n\n" when thinking is off
#   assistant turns before the last user turn lose their "<think>...</think>" block; the ones
#   after it keep it, re-spaced as "<think>\n{reasoning}\n</think>\n\n{answer}"
S, U = "<|im_start|>system\nBe brief.<|im_end|>\n", "<|im_start|>user\nWhat is 2+3?<|im_end|>\n"
SYSTEM_USER = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+3?"}]


def test_chat_generation_prompt_thinking_on_and_off(tok):
    assert tok.chat(SYSTEM_USER) == S + U + "<|im_start|>assistant\n"
    assert tok.chat(SYSTEM_USER, enable_thinking=False) == S + U + "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert tok.chat(SYSTEM_USER, add_generation_prompt=False) == S + U
    assert tok.chat(SYSTEM_USER[1:]) == U + "<|im_start|>assistant\n"


def test_chat_drops_earlier_think_blocks_and_keeps_the_current_one(tok):
    history = SYSTEM_USER + [{"role": "assistant", "content": "<think>\n2 plus 3 is 5.\n</think>\n\n5"},
                             {"role": "user", "content": "And 5+5?"}]
    u2 = "<|im_start|>user\nAnd 5+5?<|im_end|>\n"
    assert tok.chat(history) == S + U + "<|im_start|>assistant\n5<|im_end|>\n" + u2 + "<|im_start|>assistant\n"
    # the answer after the last user turn keeps its reasoning (as when training on it)
    answer = {"role": "assistant", "content": "<think>5 and 5\nmake 10</think>10"}
    assert tok.chat(history + [answer], add_generation_prompt=False) == (
        S + U + "<|im_start|>assistant\n5<|im_end|>\n" + u2
        + "<|im_start|>assistant\n<think>\n5 and 5\nmake 10\n</think>\n\n10<|im_end|>\n")
    # and the final answer without reasoning shows an empty think block, as Qwen3's template does
    plain = {"role": "assistant", "content": "10"}
    assert tok.chat(history + [plain], add_generation_prompt=False).endswith(
        u2 + "<|im_start|>assistant\n<think>\n\n</think>\n\n10<|im_end|>\n")


def test_tokenizer_without_chat_tokens(tmp_path):
    from tokenizers import Tokenizer, models
    Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]")).save(str(tmp_path / "tokenizer.json"))
    plain = tah.load_tokenizer(tmp_path)
    assert not plain.has_chat and plain.stop_ids == []
    with pytest.raises(ValueError, match="no chat format"):
        plain.chat(SYSTEM_USER)


@pytest.mark.parametrize("name, content, error, says", [
    ("tokenizer.json", b"garbage", ValueError, "tokenizer.json: Exception: expected value at line 1"),
    ("tokenizer.json", None, FileNotFoundError, "tokenizer.json is missing"),
    ("tokenizer_config.json", b"\xff{", ValueError, "tokenizer_config.json: 'utf-8' codec"),
    ("tokenizer_config.json", b"[1]", ValueError, "tokenizer_config.json: it does not hold a JSON"),
])
def test_a_bad_tokenizer_file_is_one_line_naming_it(tmp_path, name, content, error, says):
    shutil.copytree(FIXTURE, tmp_path / "ckpt", copy_function=shutil.copyfile)
    path = tmp_path / "ckpt" / name
    path.unlink()
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(error) as info:
        tah.load_tokenizer(tmp_path / "ckpt")
    assert str(tmp_path / "ckpt" / says) in str(info.value) and "\n" not in str(info.value)
