"""train.py under torchrun on a CPU (gloo): two data-parallel processes take the steps one process takes on
the same global batch; their checkpoints load on one device and generate; a run interrupted on two processes
resumes on one. Each torchrun starts two Python processes (~10 s here)."""
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file

import tah

sys.path.insert(0, str(ROOT))
import train  # noqa: E402

# 8 rows per step: 2 micro-batches of 2 on each of 2 processes, 4 of 2 in one
TOY = ["--pretrain-steps", "6", "--steps", "6", "--decider-steps", "4", "--batch", "8", "--micro-batch", "2",
       "--eval-samples", "32", "--threads", "1", "--log-every", "1"]
STAGES = ["standard", "stage1", "tah", "standard-long", "always"]
# Adam divides by the root of the squared gradients: float noise in a near-zero gradient can move a weight by
# a fraction of lr (3e-3) in one step; the losses are logged with 4 decimals
WEIGHT_ATOL, LOSS_ATOL = 3e-4, 2e-4


def torchrun(out, **env: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train.py"), *TOY, "--out", str(out)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env=os.environ | {"OMP_NUM_THREADS": "1"} | env)


def losses(out) -> dict:
    """{(stage, step): loss} from train.log."""
    log = (out / "train.log").read_text()
    return {(m[1], int(m[2])): float(m[3]) for m in re.finditer(r"^(\S+) step (\d+)/\d+ loss (\S+)", log, re.M)}


def weights(out) -> dict:
    return {f"{f.relative_to(out)}:{k}": v for s in STAGES for f in sorted((out / s).rglob("*.safetensors"))
            for k, v in load_file(f).items()}


def assert_same_run(out, ref) -> None:
    """The losses of every step of every stage and the final weights of every stage agree with ref's."""
    ours, theirs = losses(out), losses(ref)
    assert ours.keys() == theirs.keys() and len(ours) == 6 + 6 + 4 + 6 + 6
    for k in ours:
        assert ours[k] == pytest.approx(theirs[k], abs=LOSS_ATOL), k
    w, w_ref = weights(out), weights(ref)
    assert w.keys() == w_ref.keys()
    for k in w:
        assert torch.allclose(w[k], w_ref[k], rtol=0, atol=WEIGHT_ATOL), (k, float((w[k] - w_ref[k]).abs().max()))


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    """The reference: the same command in one process (in this one)."""
    out, n = tmp_path_factory.mktemp("one"), torch.get_num_threads()
    train.main(TOY + ["--out", str(out)])
    torch.set_num_threads(n)
    return out


def test_two_processes_take_the_steps_of_one(one, tmp_path):
    r = torchrun(tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    log = (tmp_path / "train.log").read_text()
    assert "(device cpu, processes 2)" in log and log.count("standard step 1/6 ") == 1  # rank 0 alone logs
    assert_same_run(tmp_path, one)
    # the checkpoint loads on one device and generates what the one-process model generates
    data = load_file(one / "data.safetensors")
    a = int(data["offsets"][data["held"][0]])
    prompt = data["ids"][a:a + train.N_LETTERS + 3].long()  # the table, the separator and the first query
    ours, ref = tah.load(tmp_path / "tah"), tah.load(one / "tah")
    assert torch.allclose(ours(prompt[None], "always").logits, ref(prompt[None], "always").logits, atol=1e-3)
    tokens = [int(t) for t, _ in tah.generate(ours, prompt, 3, policy="always")]
    assert tokens == [int(t) for t, _ in tah.generate(ref, prompt, 3, policy="always")]
    assert all(0 <= t < len(train.TOY_VOCAB) for t in tokens)
    umask = os.umask(0o022)
    os.umask(umask)
    for f in [tmp_path / "data.safetensors", tmp_path / "tah", tmp_path / "tah" / "model.safetensors"]:
        assert f.stat().st_mode & 0o777 == (0o777 if f.is_dir() else 0o666) & ~umask, f  # not owner-only


def test_interrupted_on_two_processes_resumes_on_one(one, tmp_path):
    r = torchrun(tmp_path, TRAIN_STOP_AFTER="8")  # 6 Standard steps, then 2 of stage 1
    assert r.returncode != 0 and (tmp_path / "stage1.state.pt").exists() and not (tmp_path / "stage1").exists()
    assert "stage1: interrupted after step 2" in (tmp_path / "train.log").read_text()
    n = torch.get_num_threads()
    train.main(TOY + ["--out", str(tmp_path)])
    torch.set_num_threads(n)
    assert "stage1: resuming at step 2/6" in (tmp_path / "train.log").read_text()
    assert_same_run(tmp_path, one)

