"""Shared test settings: a bounded, derandomised hypothesis profile and the fixture's path."""
import os
from pathlib import Path

import torch
from hypothesis import HealthCheck, settings

settings.register_profile("ci", deadline=None, max_examples=10, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
torch.set_num_threads(1)  # tiny models: threads cost more than they give

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT.parent / "shared" / "fixtures" / "official-tiny"  # shared/ sits beside the checkout
