"""Shared test setup: a hypothesis profile without deadlines (CPU timing on shared machines is
noisy), the repository root on sys.path so tests can import the top-level train_*.py scripts, and
float32 as the precision every test starts in."""
import os
import sys

import pytest
import torch
from hypothesis import HealthCheck, settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from minirlhf.device import set_precision  # noqa: E402

settings.register_profile(
    "minirlhf", deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "minirlhf"))
torch.set_num_threads(1)  # tiny test models gain nothing from more; avoids OpenMP thrash


@pytest.fixture(autouse=True)
def float32_by_default():
    """Each test starts in float32, the reference precision, whatever an earlier test's script
    run set (start_run applies a script's --precision to the whole process). Tests of the
    scripts run them with their own default, bf16 autocast where the hardware has it."""
    set_precision("fp32")
    yield
    set_precision("fp32")
