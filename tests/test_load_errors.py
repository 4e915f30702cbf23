"""A damaged or inconsistent checkpoint never gets past `tah.load` as a stray exception: every
case below ends in a ValueError or FileNotFoundError whose message names the file at fault.
Two checkpoints are damaged: one written by `tah.save` (decider.safetensors, an untied head) and
a copy of the reference fixture in the authors' layout (iter_decider.bin, tied embeddings).
A table of the cases we know, then a hypothesis fuzz of the JSON files, the safetensors headers
and the tensor names, and damaged iter_decider.bin files loaded in a child process (torch.load
parses them in C++)."""
import json
import random
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
JSONS = {  # each JSON file and the keys tah.load reads from it ("a.b": key b of object a)
    "config.json": ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
                    "rope_theta", "tie_word_embeddings", "rope_scaling", "max_position_embeddings"],
    "tah_config.json": ["max_iter", "adapter", "iter_decider", "input_updater_kwargs.topk",
                        *("adapter_kwargs." + k for k in ("r", "lora_alpha", "lora_dropout")),
                        *("iter_decider_kwargs." + k for k in (
                            "topk", "hidden_states_layer_nums", "hidden_dims", "expansion_factor",
                            "dropout_rate", "threshold", "normalize_input"))],
    "lora/adapter_config.json": ["r", "lora_alpha"]}


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


# ----------------------------------------------------------------------------- ways to damage files


def edit_json(name, edit):
    def apply(d):
        (d / name).write_text(json.dumps(edit(json.loads((d / name).read_text()))))
    return apply


def setting(name, **changes):  # top-level keys of a JSON file set (None: deleted)
    return edit_json(name, lambda j: {k: v for k, v in (j | changes).items()
                                      if changes.get(k, 0) is not None})


def kwargs(group, **changes):  # keys inside tah_config.json's `group` object set
    return edit_json("tah_config.json", lambda j: j | {group: (j.get(group) or {}) | changes})


def write(name, data: bytes):
    return lambda d: (d / name).write_bytes(data)


def remove(name):
    return lambda d: (d / name).unlink()


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
    names = {SHARD.replace("2-of", "1-of"): keys[::2], SHARD: keys[1::2]}
    for name, part in names.items():
        save_file({k: state[k] for k in part}, d / name)
    index = {"metadata": {}, "weight_map": {k: n for n, part in names.items() for k in part}}
    (d / INDEX).write_text(json.dumps(index))


def then(*steps):
    return lambda d: [step(d) for step in steps]


def save_decider(edit):
    def apply(d):
        blob = torch.load(d / "iter_decider.bin", weights_only=True)
        torch.save(edit(blob), d / "iter_decider.bin")
    return apply


def decider_state(edit):
    return save_decider(lambda blob: blob | {"state_dict": edit(dict(blob["state_dict"]))})


VE, FNF = ValueError, FileNotFoundError
MODEL, LORA, DECIDER, BIN = ("model.safetensors", "lora/adapter_model.safetensors",
                             "decider.safetensors", "iter_decider.bin")
CONFIG, TAH, PEFT = "config.json", "tah_config.json", "lora/adapter_config.json"
SHARD, INDEX = "model-00002-of-00002.safetensors", "model.safetensors.index.json"
DECIDER_KEY = "backbone.output_layer.1.weight"
LORA_KEY = "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"
CASES = [  # (checkpoint, damage, file named in the error, what the message says, error type)
    (OURS, truncate(MODEL), MODEL, "SafetensorError: .*damaged", VE),
    (OURS, truncate(MODEL, 0.001), MODEL, "SafetensorError: .*header", VE),
    (OURS, truncate(LORA), LORA, "damaged", VE),
    (OURS, truncate(DECIDER, 0.9), DECIDER, "damaged", VE),
    (OURS, flip(MODEL, 7, 0x01), MODEL, "damaged", VE),  # the header's length
    (OURS, flip(MODEL, 9), MODEL, "damaged", VE),  # the header's JSON
    (OURS, then(shard, truncate(SHARD)), SHARD, "damaged", VE),
    (OURS, then(shard, setting(INDEX, weight_map=[1])), INDEX, "'list' object has no attribute 'values'", VE),
    (OURS, then(shard, setting(INDEX, weight_map={"a": "../x"})), INDEX, "weight_map must name files in", VE),
    (OURS, edit_json(CONFIG, lambda j: [j]), CONFIG, "does not hold a JSON object", VE),
    (OURS, write(CONFIG, b"\xff\xfe{"), CONFIG, "can't decode byte 0xff", VE),
    (OURS, setting(CONFIG, hidden_size="16"), CONFIG, "hidden_size is '16'; it must be int", VE),
    (OURS, setting(CONFIG, num_hidden_layers=-2), CONFIG, r"num_hidden_layers is -2; it must be int in \[1, ", VE),
    (OURS, setting(CONFIG, vocab_size=2**40), CONFIG, r"vocab_size is 1099511627776; it must be int in \[1, 1048576\]", VE),
    (OURS, setting(CONFIG, num_attention_heads=0), CONFIG, "num_attention_heads is 0; it must be int", VE),
    (OURS, setting(CONFIG, rope_scaling=[1]), CONFIG, "AttributeError: 'list' object has no attribute 'get'", VE),
    (OURS, setting(CONFIG, rms_norm_eps="tiny"), CONFIG, "rms_norm_eps is 'tiny'; it must be float", VE),
    (OURS, setting(CONFIG, tie_word_embeddings="no"), CONFIG, "tie_word_embeddings is 'no'; it must be bool", VE),
    (OURS, setting(CONFIG, num_hidden_layers=None), MODEL,  # the default: Qwen3-0.6B's 28 layers
     r'Missing key\(s\) in state_dict: "model.layers.2.input_layernorm', VE),
    (OURS, edit_json(TAH, lambda j: [j]), TAH, "not hold a JSON object", VE),
    (OURS, setting(TAH, iter_decider_kwargs=None), TAH, "hidden_states_layer_nums is None; it must list", VE),
    (OURS, kwargs("iter_decider_kwargs", hidden_states_layer_nums=[0, 3]), TAH,
     r"hidden_states_layer_nums is \[0, 3\]; it must list hidden-state indices in \[0, 2\]", VE),
    (OURS, kwargs("iter_decider_kwargs", topk=41), TAH,
     r"decider_topk is 41; it must be int in \[1, 40\]", VE),
    (OURS, kwargs("input_updater_kwargs", topk=41), TAH,
     r"input_topk is 41; it must be int in \[1, 40\]", VE),
    (OURS, kwargs("iter_decider_kwargs", hidden_dims="16"), TAH, "decider_dims is '16'; it must be list", VE),
    (OURS, kwargs("adapter_kwargs", lora_dropout=1.5), TAH, r"lora_dropout is 1.5; it must be float in \[0, 1\]", VE),
    (OURS, setting(TAH, max_iter="2"), TAH, "max_iter is '2'; it must be int", VE),
    (OURS, setting(TAH, adapter_kwargs=None), TAH, "adapter_kwargs must give r and lora_alpha", VE),
    (OURS, kwargs("adapter_kwargs", r=4), PEFT, "disagree", VE),
    (OURS, then(remove(PEFT), kwargs("adapter_kwargs", r=4)), LORA,
     r"size mismatch for .*lora_[AB]\.weight: copying a param with shape torch.Size\(\[\d+, \d+\]\)", VE),
    (OURS, edit_tensors(MODEL, lambda s: rename(s, "model.norm.weight", "model.norm.scale")), MODEL,
     r'Missing key\(s\) in state_dict: "model.norm.weight". Unexpected key\(s\) in state_dict: '
     r'"model.norm.scale"', VE),
    (OURS, edit_tensors(DECIDER, lambda s: s.pop(DECIDER_KEY)), DECIDER,
     f'Missing key\\(s\\) in state_dict: "decider.{DECIDER_KEY}"', VE),
    (OURS, edit_tensors(LORA, lambda s: rename(s, LORA_KEY, LORA_KEY + "s")), LORA,
     r'Missing key\(s\) in state_dict: "model.layers.0.mlp.up_proj.lora_A.weight". '
     r'Unexpected key\(s\) in state_dict: "model.layers.0.mlp.up_proj.lora_A.weights"', VE),
    (OURS, edit_tensors(MODEL, lambda s: s.update({"lm_head.weight": s["lm_head.weight"].int()})),
     MODEL, "lm_head.weight.*Only Tensors of floating point", VE),
    (OURS, edit_tensors(MODEL, lambda s: s.update({"extra": torch.zeros(1)})), MODEL,
     r'Unexpected key\(s\) in state_dict: "extra"', VE),
    (OURS, remove(MODEL), "", "model.safetensors is missing", FNF),
    (OURS, remove(DECIDER), "", "decider.safetensors is missing", FNF),
    (OURS, remove(LORA), LORA, "adapter_model.safetensors is missing", FNF),
    (OURS, remove(CONFIG), CONFIG, "missing", FNF),
    (OURS, then(remove(CONFIG), lambda d: (d / CONFIG).mkdir()), CONFIG, "IsADirectoryError", VE),
    (AUTHORS, save_decider(lambda blob: [blob]), BIN, "TypeError: list indices", VE),
    (AUTHORS, save_decider(lambda blob: {"class": blob["class"]}), BIN, "KeyError: 'state_dict'", VE),
    (AUTHORS, decider_state(lambda s: s | {"x": 1}), BIN, "AttributeError: 'int' object has no attribute", VE),
    (AUTHORS, decider_state(lambda s: s | {3: torch.ones(1)}), BIN, "TypeError: can only concatenate str", VE),
    (AUTHORS, decider_state(lambda s: {k: v.long() for k, v in s.items()}), BIN, "Only Tensors of floating point", VE),
    (AUTHORS, decider_state(lambda s: {k: s[k] for k in s if "logits_projection.w" not in k}), BIN,
     r'Missing key\(s\) in state_dict: "decider.logits_projection.weight"', VE),
    (AUTHORS, truncate(BIN), BIN, "damaged", VE),
    (AUTHORS, setting(TAH, iter_decider_kwargs=None), TAH,
     "hidden_states_layer_nums is None; it must list", VE),
    (AUTHORS, kwargs("iter_decider_kwargs", hidden_states_layer_nums=None), TAH,
     "hidden_states_layer_nums is None; it must list", VE),
    (AUTHORS, setting(PEFT, r=8), PEFT, r"r, lora_alpha = 8, 8 disagree with tah_config.json's \(4, 8\)", VE),
    (AUTHORS, edit_json(PEFT, lambda j: [j]), PEFT, "not hold a JSON object", VE),
    (AUTHORS, kwargs("adapter_kwargs", r=8), PEFT, "disagree", VE),
    (AUTHORS, truncate(LORA, 0.99), LORA, "damaged", VE),
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
        setting(name, some_new_key=[1, {"x": None}])(d)
    kwargs("iter_decider_kwargs", new_knob=3)(d)
    m, ref = tah.load(d), tah.load(bases / OURS)
    assert m.config == ref.config and m.tah == ref.tah
    ids = torch.arange(12)[None] % SETUP.vocab
    assert torch.equal(m(ids).logits, ref(ids).logits)


def test_a_tied_checkpoint_may_store_its_head(bases, tmp_path):
    d = copy(bases, AUTHORS, tmp_path / "ckpt")
    edit_tensors(MODEL, lambda s: s.update({"lm_head.weight": -s["model.embed_tokens.weight"]}))(d)
    m = tah.load(d)
    assert m.lm_head.weight is m.model.embed_tokens.weight  # the config's tie wins


# ----------------------------------------------------------------------------- fuzzing


VALUES = st.one_of(st.integers(-3, 3), st.text(max_size=3), st.sampled_from([2**21, 2**70]),
                   st.floats(), st.lists(st.integers(-2, 50), max_size=3), st.booleans(),
                   st.dictionaries(st.text(max_size=2), st.integers(-1, 2), max_size=2), st.none())


@st.composite
def damages(draw, base):
    """One random change to a checkpoint: a JSON key deleted, replaced (wrong type, negative,
    huge) or added, a whole JSON file replaced; a safetensors file truncated, a byte of its
    header flipped, a tensor renamed or stored in another dtype."""
    kind = draw(st.sampled_from(["json", "truncate", "flip", "rename", "dtype"]))
    if kind == "json":
        name = draw(st.sampled_from(sorted(JSONS)))
        how = draw(st.sampled_from(["delete", "set", "add", "all"]))
        key = draw(st.one_of(st.sampled_from(JSONS[name]), st.integers(0, 999)))  # or any key
        return (kind, name, how, key, draw(VALUES))
    name = draw(st.sampled_from(SAFETENSORS[base]))
    if kind == "truncate":
        return (kind, name, draw(st.floats(0, 1, exclude_max=True)))
    if kind == "flip":
        return (kind, name, draw(st.integers(0, 9999)), draw(st.integers(1, 255)))
    if kind == "rename":
        return (kind, name, draw(st.integers(0, 999)), draw(st.sampled_from(["", "x", ".w", "_"])))
    return (kind, name, draw(st.integers(0, 999)),
            draw(st.sampled_from([torch.int32, torch.bool, torch.float16, torch.float64])))


def apply(d: Path, damage) -> None:
    kind, name, *args = damage
    if kind == "json":
        how, key, value = args
        j = json.loads((d / name).read_text())
        paths = [(k,) for k in j] + [(k, k2) for k in j if type(j[k]) is dict for k2 in j[k]]
        if type(key) is int:
            key = paths[key % len(paths)] if paths and how != "add" else ("fuzz_extra",)
        *outer, key = key if type(key) is tuple else key.split(".")
        obj = j.setdefault(outer[0], {}) if outer else j
        obj = obj if type(obj) is dict else {}
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


@settings(max_examples=50)
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


CHILD = """
import shutil, sys
import tah
d, *variants = sys.argv[1:]
for v in variants:
    shutil.copyfile(v, d + "/iter_decider.bin")
    try:
        tah.load(d)
        print("loaded")
    except (ValueError, FileNotFoundError) as e:
        print("named" if d + "/iter_decider.bin" in str(e) else repr(e).replace(" ", "_"))
"""


def test_damaged_decider_pickles_in_a_child_process(bases, tmp_path):
    """torch.load parses iter_decider.bin (a zip of a pickle) in C++, where a damaged file might
    crash the process: damaged copies are loaded in a child, so that a crash fails this test."""
    d = copy(bases, AUTHORS, tmp_path / "ckpt")
    data, rng, variants = (d / "iter_decider.bin").read_bytes(), random.Random(0), []
    for i in range(24):
        b = bytearray(data[:rng.randrange(len(data))] if i % 4 == 0 else data)
        for _ in range(rng.randint(1, 4) if i % 4 else 0):  # the zip's headers lie at both ends
            at = rng.randrange(1024) if rng.random() < 0.5 else len(b) - 1 - rng.randrange(1024)
            b[at] ^= rng.randint(1, 255)
        variants.append(tmp_path / f"v{i}.bin")
        variants[-1].write_bytes(bytes(b))
    child = subprocess.run([sys.executable, "-c", CHILD, str(d), *map(str, variants)], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-3000:]
    outcomes = child.stdout.split()
    assert len(outcomes) == len(variants) and set(outcomes) <= {"loaded", "named"}, outcomes
    assert outcomes.count("named") >= len(variants) // 2, outcomes  # most damage is noticed
