"""Shared test setup: a hypothesis profile without deadlines (CPU timing on shared machines is
noisy), the repository root on sys.path so tests can import the top-level train_*.py scripts."""
import os
import sys

import torch
from hypothesis import HealthCheck, settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

settings.register_profile(
    "minirlhf", deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "minirlhf"))
torch.set_num_threads(1)  # tiny test models gain nothing from more; avoids OpenMP thrash
