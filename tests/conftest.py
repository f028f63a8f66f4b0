"""Shared test setup: offline hub, project root on sys.path, the Hydra resolvers."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402
import torch  # noqa: E402

from evaluators.config import register_resolvers  # noqa: E402

register_resolvers()


@pytest.fixture(autouse=True)
def _one_thread():
    """The models in tests are small: one thread beats oversubscribed intra-op threads on a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
