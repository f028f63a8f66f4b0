"""Seeds derived from (noise seed, task, sample id, purpose), so a sample's randomness never depends on which
other samples share its batch, on the batch size, or on whether the run was resumed."""

from __future__ import annotations

import hashlib

import numpy as np
import torch


def derive_seed(*parts: object) -> int:
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def generators(seeds: list[int], device: str | torch.device = "cpu") -> list[torch.Generator]:
    return [torch.Generator(device=device).manual_seed(s) for s in seeds]


def select_subset(ids: list[str], n: int, seed: int) -> list[str]:
    """The evaluated subset: a seeded permutation of the data set's ids, first n (all if n >= len)."""
    order = np.random.default_rng(seed).permutation(len(ids))
    return [ids[i] for i in order[: min(n, len(ids))]]
