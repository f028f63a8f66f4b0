"""The contract every purification defense follows."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn


def check_flags(prefix: str, **flags: object) -> None:
    """Config switches of the purifiers and denoisers must be booleans (a string such as "no" would be truthy)."""
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise ValueError(f"{prefix}.{name} must be true or false, got {value!r}")


@dataclass
class PurifyInfo:
    """What one purification did to one image (written into samples.jsonl)."""

    t: float = 0.0  # diffusion time reached before the reverse pass, in [0, 1]
    steps: int = 0  # forward steps taken (DiffCAP) or reverse steps (DiffPure)
    denoiser_evals: int = 0
    encoder_evals: int = 0
    converged: bool = True  # False when DiffCAP hit t_max without passing the similarity test
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


class Purifier(nn.Module, ABC):
    """Maps images in [0, 1] at the VLM's resolution to purified images of the same shape.

    Randomness comes only from ``generators``: one ``torch.Generator`` per image, so an image's result
    does not depend on which other images share its batch.
    """

    #: True when two calls with different noise can give different outputs.
    randomized: bool = False

    def attach(self, vlm: nn.Module) -> None:
        """Called once by the runner with the VLM being defended (DiffCAP may embed with it)."""

    @abstractmethod
    def purify(
        self, x: torch.Tensor, generators: Sequence[torch.Generator]
    ) -> tuple[torch.Tensor, list[PurifyInfo]]:
        """Return purified images (same shape, in [0, 1]) and one PurifyInfo per image."""


class NoDefense(Purifier):
    """Identity: the undefended model."""

    def purify(self, x, generators):
        return x, [PurifyInfo() for _ in range(x.shape[0])]
