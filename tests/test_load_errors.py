"""A damaged or inconsistent checkpoint never gets past `tah.load` as a stray exception: every
case below ends in a ValueError or FileNotFoundError whose message names the file at fault.
Two checkpoints are damaged: one written by `tah.save` (decider.safetensors, an untied head) and
a copy of the reference fixture in the authors' layout (iter_decider.bin, tied embeddings).
A table of the cases we know, then a hypothesis fuzz of the JSON files, the safetensors headers
and the tensor names."""
import json
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import tah
from conftest import FIXTURE, ROOT
from test_tah import Setup, build

SETUP = Setup(layers=2, kv_heads=1, groups=2, head_dim=8, hidden=16, vocab=40, tie=False,
              lora_r=2, input_topk=4, decider_topk=4, decider_layers=(0, 2), decider_dims=(16, 8),
              max_iter=2, seed=0)
OURS, AUTHORS = "ours", "authors"
SAFETENSORS = {OURS: ["model.safetensors", "lora/adapter_model.safetensors", "decider.safetensors"],
               AUTHORS: ["model.safetensors", "lora/adapter_model.safetensors"]}
JSONS = ["config.json", "tah_config.json", "lora/adapter_config.json"]


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    tah.save(build(SETUP), root / OURS)
    shutil.copytree(FIXTURE, root / AUTHORS, copy_function=shutil.copyfile)
    return root


def copy(bases: Path, base: str, dst: Path) -> Path:
    shutil.copytree(bases / base, dst, copy_function=shutil.copyfile)
    return dst


def expect_named_error(d: Path, kind=(ValueError, FileNotFoundError)) -> str:
    """tah.load(d) raises `kind` naming a file of d; returns the message."""
    with pytest.raises(Exception) as info:
        tah.load(d)
    assert isinstance(info.value, kind), f"{type(info.value).__name__}: {info.value}"
    message = str(info.value)
    assert str(d) in message and "\n" not in message, message
    return message


# ----------------------------------------------------------------------------- ways to damage a file


def edit_json(name, edit):
    def apply(d):
        j = json.loads((d / name).read_text())
        (d / name).write_text(json.dumps(edit(j)))
    return apply


def write(name, data: bytes):
    return lambda d: (d / name).write_bytes(data)


def truncate(name, keep=0.5):
    def apply(d):
        data = (d / name).read_bytes()
        (d / name).write_bytes(data[:int(len(data) * keep)])
    return apply


def flip(name, at, mask=0xFF):
    def apply(d):
        data = bytearray((d / name).read_bytes())
        data[at % len(data)] ^= mask
        (d / name).write_bytes(bytes(data))
    return apply


def edit_tensors(name, edit):
    def apply(d):
        state = load_file(d / name)
        edit(state)
        save_file(state, d / name)
    return apply


def rename(state, old, new):
    state[new] = state.pop(old)


def shard(d):  # model.safetensors split in two shards with an index
    state = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    keys = sorted(state)
    names = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, part in names.items():
        save_file({k: state[k] for k in part}, d / name)
    index = {"metadata": {}, "weight_map": {k: n for n, part in names.items() for k in part}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))


def then(*steps):
    return lambda d: [step(d) for step in steps]


def save_decider(edit):
    def apply(d):
        blob = torch.load(d / "iter_decider.bin", weights_only=True)
        torch.save(edit(blob), d / "iter_decider.bin")
    return apply


def kwargs(key, **changes):
    return lambda j: j | {key: (j.get(key) or {}) | changes}


DECIDER_KEY = "decider.backbone.output_layer.1.weight"
LORA_KEY = "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"
CASES = [  # (checkpoint, damage, file named in the error, what the message says, error type)
    (OURS, truncate("model.safetensors"), "model.safetensors", "truncated or damaged", ValueError),
    (OURS, truncate("model.safetensors", 0.001), "model.safetensors", "truncated", ValueError),
    (OURS, truncate("lora/adapter_model.safetensors"), "lora/adapter_model.safetensors", "damaged",
     ValueError),
    (OURS, truncate("decider.safetensors", 0.9), "decider.safetensors", "damaged", ValueError),
    (OURS, flip("model.safetensors", 7, 0x01), "model.safetensors", "damaged", ValueError),  # length
    (OURS, flip("model.safetensors", 9), "model.safetensors", "damaged", ValueError),  # header JSON
    (OURS, then(shard, truncate("model-00002-of-00002.safetensors")),
     "model-00002-of-00002.safetensors", "damaged", ValueError),
    (OURS, then(shard, edit_json("model.safetensors.index.json", lambda j: {"weight_map": [1]})),
     "model.safetensors.index.json", "weight_map must be an object", ValueError),
    (OURS, then(shard, edit_json("model.safetensors.index.json", lambda j: {"weight_map": {"a": "../x"}})),
     "model.safetensors.index.json", "file names in", ValueError),
    (OURS, edit_json("config.json", lambda j: [j]), "config.json", "holds a list, not a JSON object", ValueError),
    (OURS, write("config.json", b"\xff\xfe{"), "config.json", "not valid JSON", ValueError),
    (OURS, edit_json("config.json", lambda j: j | {"hidden_size": "16"}), "config.json",
     "hidden_size must be a positive integer", ValueError),
    (OURS, edit_json("config.json", lambda j: j | {"num_hidden_layers": -2}), "config.json",
     "num_hidden_layers must be a positive integer", ValueError),
    (OURS, edit_json("config.json", lambda j: j | {"vocab_size": 2**40}), "config.json",
     "vocab_size must be a positive integer up to", ValueError),
    (OURS, edit_json("config.json", lambda j: j | {"num_attention_heads": 0}), "config.json",
     "num_attention_heads must be", ValueError),
    (OURS, edit_json("config.json", lambda j: j | {"rope_scaling": [1]}), "config.json",
     "rope_scaling must be an object", ValueError),
    (OURS, edit_json("config.json", lambda j: j | {"rms_norm_eps": "tiny"}), "config.json",
     "rms_norm_eps must be a positive number", ValueError),
    (OURS, edit_json("config.json", lambda j: j | {"tie_word_embeddings": "no"}), "config.json",
     "tie_word_embeddings must be true or false", ValueError),
    (OURS, edit_json("config.json", lambda j: {k: v for k, v in j.items() if k != "num_hidden_layers"}),
     "model.safetensors", r"do not match config\.json.*missing \[\] unexpected \[\]|missing", ValueError),
    (OURS, edit_json("tah_config.json", lambda j: [j]), "tah_config.json", "holds a list", ValueError),
    (OURS, edit_json("tah_config.json", lambda j: {k: v for k, v in j.items() if k != "iter_decider_kwargs"}),
     "tah_config.json", "hidden_states_layer_nums must be a list", ValueError),
    (OURS, edit_json("tah_config.json", kwargs("iter_decider_kwargs", hidden_states_layer_nums=[0, 3])),
     "tah_config.json", r"hidden_states_layer_nums must be .* and at most 2 .*got \[0, 3\]", ValueError),
    (OURS, edit_json("tah_config.json", kwargs("iter_decider_kwargs", topk=41)), "tah_config.json",
     r"iter_decider_kwargs.topk must be .* and at most 40 .*got 41", ValueError),
    (OURS, edit_json("tah_config.json", kwargs("input_updater_kwargs", topk=41)), "tah_config.json",
     r"input_updater_kwargs.topk must be .* and at most 40 .*got 41", ValueError),
    (OURS, edit_json("tah_config.json", kwargs("iter_decider_kwargs", hidden_dims="16")),
     "tah_config.json", "hidden_dims must be a list", ValueError),
    (OURS, edit_json("tah_config.json", kwargs("adapter_kwargs", lora_dropout=1.5)), "tah_config.json",
     r"lora_dropout must be a number in \[0, 1\]", ValueError),
    (OURS, edit_json("tah_config.json", lambda j: j | {"max_iter": "2"}), "tah_config.json",
     "max_iter must be", ValueError),
    (OURS, edit_json("tah_config.json", lambda j: j | {"adapter_kwargs": None}), "tah_config.json",
     "adapter_kwargs.r must be a positive integer", ValueError),
    (OURS, edit_json("tah_config.json", kwargs("adapter_kwargs", r=4)), "lora/adapter_config.json",
     "disagree", ValueError),
    (OURS, then(lambda d: (d / "lora/adapter_config.json").unlink(),
                edit_json("tah_config.json", kwargs("adapter_kwargs", r=4))),
     "lora/adapter_model.safetensors", r"lora_[AB]\.weight has shape \(\d+, \d+\) \(torch.float32\) but", ValueError),
    (OURS, edit_tensors("model.safetensors", lambda s: rename(s, "model.norm.weight", "model.norm.scale")),
     "model.safetensors", r"missing \['model.norm.weight'\] unexpected \['model.norm.scale'\]", ValueError),
    (OURS, edit_tensors("decider.safetensors", lambda s: s.pop(DECIDER_KEY.removeprefix("decider."))),
     "decider.safetensors", f"missing \\['{DECIDER_KEY}'\\]", ValueError),
    (OURS, edit_tensors("lora/adapter_model.safetensors", lambda s: rename(s, LORA_KEY, LORA_KEY + "s")),
     "lora/adapter_model.safetensors", r"missing \['model.layers.0.mlp.up_proj.lora_A.weight'\] "
     r"unexpected \['model.layers.0.mlp.up_proj.lora_A.weights'\]", ValueError),
    (OURS, edit_tensors("model.safetensors", lambda s: s.update({"lm_head.weight": s["lm_head.weight"].int()})),
     "model.safetensors", r"lm_head.weight has shape \(40, 16\) \(torch.int32\)", ValueError),
    (OURS, edit_tensors("model.safetensors", lambda s: s.update({"extra": torch.zeros(1)})),
     "model.safetensors", r"unexpected \['extra'\]", ValueError),
    (OURS, lambda d: (d / "model.safetensors").unlink(), "", "no model.safetensors", FileNotFoundError),
    (OURS, lambda d: (d / "decider.safetensors").unlink(), "", "no decider.safetensors or iter_decider.bin",
     FileNotFoundError),
    (OURS, lambda d: (d / "config.json").unlink(), "config.json", "missing", FileNotFoundError),
    (OURS, lambda d: [(d / "config.json").unlink(), (d / "config.json").mkdir()], "config.json",
     "not valid JSON", ValueError),
    (AUTHORS, save_decider(lambda blob: [blob]), "iter_decider.bin", "not a decider", ValueError),
    (AUTHORS, save_decider(lambda blob: {"class": blob["class"]}), "iter_decider.bin", "not a decider",
     ValueError),
    (AUTHORS, save_decider(lambda blob: blob | {"state_dict": {**blob["state_dict"], "x": 1}}),
     "iter_decider.bin", "not a decider", ValueError),
    (AUTHORS, save_decider(lambda blob: blob | {"state_dict": {**blob["state_dict"], 3: torch.ones(1)}}),
     "iter_decider.bin", "not a decider", ValueError),
    (AUTHORS, save_decider(lambda blob: blob | {"state_dict": {
        k: v.long() if k.endswith("bias") else v for k, v in blob["state_dict"].items()}}),
     "iter_decider.bin", "not a decider", ValueError),
    (AUTHORS, save_decider(lambda blob: blob | {"state_dict": {
        k: v for k, v in blob["state_dict"].items() if k != "combined_projection.bias"}}),
     "iter_decider.bin", r"missing \['decider.combined_projection.bias'\]", ValueError),
    (AUTHORS, truncate("iter_decider.bin"), "iter_decider.bin", "damaged", ValueError),
    (AUTHORS, edit_json("tah_config.json", lambda j: {k: v for k, v in j.items() if k != "iter_decider_kwargs"}),
     "tah_config.json", "iter_decider_kwargs.hidden_states_layer_nums must be", ValueError),
    (AUTHORS, edit_json("tah_config.json", kwargs("iter_decider_kwargs", hidden_states_layer_nums=None)),
     "tah_config.json", "hidden_states_layer_nums must be a list of integers.*got None", ValueError),
    (AUTHORS, edit_json("lora/adapter_config.json", lambda j: j | {"r": 8}), "lora/adapter_config.json",
     r"r, lora_alpha = \(8, 8\) disagree with tah_config.json.s \(4, 8\)", ValueError),
    (AUTHORS, edit_json("lora/adapter_config.json", lambda j: [j]), "lora/adapter_config.json",
     "holds a list", ValueError),
    (AUTHORS, edit_json("tah_config.json", kwargs("adapter_kwargs", r=8)), "lora/adapter_config.json",
     "disagree", ValueError),
    (AUTHORS, truncate("lora/adapter_model.safetensors", 0.99), "lora/adapter_model.safetensors",
     "damaged", ValueError),
]


@pytest.mark.parametrize("base, damage, file, says, kind", CASES, ids=[
    f"{i}-{c[0]}-{c[2] or 'dir'}" for i, c in enumerate(CASES)])
def test_damaged_checkpoint_names_the_file(bases, tmp_path, base, damage, file, says, kind):
    d = copy(bases, base, tmp_path / "ckpt")
    damage(d)
    message = expect_named_error(d, kind)
    assert str(d / file) in message, message
    assert re.search(says, message), message


def test_extra_keys_are_fine(bases, tmp_path):
    d = copy(bases, OURS, tmp_path / "ckpt")
    for name in JSONS:
        edit_json(name, lambda j: j | {"some_new_key": [1, {"x": None}]})(d)
    edit_json("tah_config.json", kwargs("iter_decider_kwargs", new_knob=3))(d)
    m, ref = tah.load(d), tah.load(bases / OURS)
    assert m.config == ref.config and m.tah == ref.tah
    ids = torch.arange(12)[None] % SETUP.vocab
    assert torch.equal(m(ids).logits, ref(ids).logits)


def test_a_tied_checkpoint_may_store_its_head(bases, tmp_path):
    d = copy(bases, AUTHORS, tmp_path / "ckpt")
    edit_tensors("model.safetensors", lambda s: s.update({"lm_head.weight": s["model.embed_tokens.weight"] * 2}))(d)
    m = tah.load(d)
    assert m.lm_head.weight is m.model.embed_tokens.weight  # the config's tie wins


# ----------------------------------------------------------------------------- fuzzing


VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.sampled_from([2**20 + 1, 2**70]),
                   st.floats(), st.text(max_size=3), st.lists(st.integers(-2, 50), max_size=3),
                   st.dictionaries(st.text(max_size=2), st.integers(-1, 2), max_size=2))


@st.composite
def damages(draw, base):
    """One random change to a checkpoint: a JSON key deleted, replaced (wrong type, negative,
    huge) or added, a whole JSON file replaced; a safetensors file truncated, a byte of its
    header flipped, a tensor renamed or stored in another dtype."""
    kind = draw(st.sampled_from(["json", "truncate", "flip", "rename", "dtype"]))
    if kind == "json":
        return (kind, draw(st.sampled_from(JSONS)), draw(st.sampled_from(["delete", "set", "add", "all"])),
                draw(st.integers(0, 999)), draw(VALUES))
    name = draw(st.sampled_from(SAFETENSORS[base]))
    if kind == "truncate":
        return (kind, name, draw(st.floats(0, 1, exclude_max=True)))
    if kind == "flip":
        return (kind, name, draw(st.integers(0, 9999)), draw(st.integers(1, 255)))
    if kind == "rename":
        return (kind, name, draw(st.integers(0, 999)), draw(st.sampled_from(["", "x", ".weight", "_"])))
    return (kind, name, draw(st.integers(0, 999)),
            draw(st.sampled_from([torch.int32, torch.int8, torch.bool, torch.float16, torch.float64])))


def apply(d: Path, damage) -> None:
    kind, name, *args = damage
    if kind == "json":
        how, pick, value = args
        j = json.loads((d / name).read_text())
        paths = [(k,) for k in j] + [(k, k2) for k in j if type(j[k]) is dict for k2 in j[k]]
        *outer, key = paths[pick % len(paths)] if paths and how != "add" else ("fuzz_extra",)
        obj = j[outer[0]] if outer else j
        if how == "delete":
            obj.pop(key, None)
        else:
            obj[key] = value
        (d / name).write_text(json.dumps(value if how == "all" else j))
    elif kind == "truncate":
        truncate(name, args[0])(d)
    elif kind == "flip":  # a byte of the 8-byte length or of the JSON header after it
        data = (d / name).read_bytes()
        flip(name, args[0] % (8 + struct.unpack("<Q", data[:8])[0]), args[1])(d)
    else:
        pick, change = args
        state = load_file(d / name)
        key = sorted(state)[pick % len(state)]
        if kind == "rename":
            rename(state, key, key + change if change else sorted(state)[(pick + 1) % len(state)])
        else:
            state[key] = state[key].to(change)
        save_file(state, d / name)


@settings(max_examples=60)
@given(data=st.data(), base=st.sampled_from([OURS, AUTHORS]))
def test_fuzzed_checkpoint_loads_or_names_the_file(bases, data, base):
    changes = data.draw(st.lists(damages(base), min_size=1, max_size=3))
    with tempfile.TemporaryDirectory() as tmp:
        d = copy(bases, base, Path(tmp) / "ckpt")
        for damage in changes:
            try:
                apply(d, damage)
            except Exception:  # an earlier change left nothing this one can read: skip it
                pass
        try:
            tah.load(d)
        except (ValueError, FileNotFoundError) as e:
            assert str(d) in str(e) and "\n" not in str(e), str(e)
