"""Shared test setup: offline hub, the Hydra resolvers (the packages are installed by ``uv sync``)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

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


@pytest.fixture(scope="session")
def good_run(tmp_path_factory):
    """A finished good run (world, run folder, cache) that the bad-input cases copy and damage."""
    from tests.bad_inputs import make_good_run

    return make_good_run(tmp_path_factory.mktemp("good"))
