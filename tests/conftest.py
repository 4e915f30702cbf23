"""Shared test settings and helpers: a bounded, derandomised hypothesis profile, the fixture's
path and `close` (tensors equal to a tolerance)."""
import os
from pathlib import Path

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
