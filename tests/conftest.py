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

def _inside(p: str, root: str) -> bool:
    return p == root or p.startswith(root.rstrip(os.sep) + os.sep)


# Folders beside the checkout that a test may still touch: the Python installation (a venv is
# often made next to the clone) and the temporary directory (pytest's tmp_path lives there).
# A folder that holds the checkout itself (a clone made inside /tmp) cannot be allowed whole.
TEMP = os.path.realpath(tempfile.gettempdir())
ALLOWED = {a for a in map(os.path.realpath, (sys.prefix, sys.base_prefix, sys.exec_prefix, TEMP,
                                              *sysconfig.get_paths().values()))
           if not _inside(str(ROOT), a)}


def outside_repository(path) -> bool:
    """True for a path next to the checkout (under its parent folder, not inside it)."""
    p = os.path.realpath(os.fsdecode(path))
    if not _inside(p, str(ROOT.parent)) or _inside(p, str(ROOT)):
        return False
    if any(_inside(p, a) for a in ALLOWED):
        return False
    # a checkout right in the temporary directory: pytest's and tempfile's folders sit beside it
    first = os.path.relpath(p, TEMP).split(os.sep)[0] if _inside(p, TEMP) else ""
    return not first.startswith(("pytest-of-", "tmp"))


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
