"""Shared test settings and helpers: a bounded, derandomised hypothesis profile, the fixture's
path, `close` (tensors equal to a tolerance), and a guard that fails any test that opens a file
beside the checkout (a user's clone has nothing there)."""
import os
import sys
import sysconfig
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile("ci", deadline=None, max_examples=10, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
torch.set_num_threads(1)  # tiny models: threads cost more than they give

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "official-tiny"  # the authors' reference outputs
ATOL = 1e-5  # parity with the fixture and between our own paths, fp32


def close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> None:
    """Same shape and every element within atol (compared in fp32)."""
    assert a.shape == b.shape, (a.shape, b.shape)
    if a.numel():
        diff = (a.float() - b.float()).abs().max().item()
        assert diff <= atol, f"max abs diff {diff} > {atol}"

# Folders beside the checkout that a test may still touch: the Python installation (a venv is
# often made next to the clone) and the temporary directory (pytest's tmp_path lives there).
ALLOWED = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix,
                                         tempfile.gettempdir(), *sysconfig.get_paths().values())}


def outside_repository(path) -> bool:
    """True for a path next to the checkout (under its parent folder, not inside it)."""
    p = os.path.realpath(os.fsdecode(path))
    inside = lambda root: p == root or p.startswith(root + os.sep)  # noqa: E731
    return inside(str(ROOT.parent)) and not inside(str(ROOT)) and not any(map(inside, ALLOWED))


OPENED_OUTSIDE: list[str] = []


def _audit(event: str, args: tuple) -> None:
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)) and \
            outside_repository(args[0]):
        OPENED_OUTSIDE.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)  # sees every open() of this process, including numpy's and torch's


@pytest.fixture(autouse=True)
def reads_only_the_repository():
    """Fails the test that opened a file outside the repository root, naming the file."""
    before = len(OPENED_OUTSIDE)
    yield
    opened = OPENED_OUTSIDE[before:]
    assert not opened, f"the test read {opened[:3]}: outside the repository, which a clone lacks"
