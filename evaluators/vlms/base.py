"""The contract every vision-language model adapter follows.

Images enter as float tensors in [0, 1], shape (B, 3, R, R) with R = ``resolution``; the adapter
normalises internally, so an L-infinity eps means the same thing for every model.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torch import nn


class VLMAdapter(nn.Module, ABC):
    """Base class for the tiny models and the real VLMs (LLaVA, OpenFlamingo, CLIP)."""

    #: Side of the square pixel input the model sees (pixels in [0, 1]).
    resolution: int
    #: Task names this model can do: a subset of {"captioning", "vqa", "classification"}.
    tasks: tuple[str, ...] = ()

    def to_pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Resize PIL images to the model's input: (B, 3, R, R) floats in [0, 1], no normalisation."""
        from evaluators.vlms.pixels import resize_square

        return torch.stack([resize_square(im, self.resolution) for im in images])

    @abstractmethod
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled, L2-normalised image embedding (B, D) of the model's own vision encoder."""

    def caption(self, x: torch.Tensor) -> list[str]:
        raise NotImplementedError(f"{type(self).__name__} does not do captioning")

    def answer(self, x: torch.Tensor, questions: Sequence[str]) -> list[str]:
        raise NotImplementedError(f"{type(self).__name__} does not do VQA")

    def classify(self, x: torch.Tensor, classnames: Sequence[str]) -> torch.Tensor:
        """Zero-shot logits (B, C), differentiable in x."""
        raise NotImplementedError(f"{type(self).__name__} does not do zero-shot classification")

    def caption_loss(self, x: torch.Tensor, captions: Sequence[str]) -> torch.Tensor:
        """Per-sample mean token cross-entropy of ``captions[i]`` given image i (B,), differentiable in x."""
        raise NotImplementedError(f"{type(self).__name__} does not do captioning")

    def answer_loss(self, x: torch.Tensor, questions: Sequence[str], answers: Sequence[str]) -> torch.Tensor:
        """Per-sample mean token cross-entropy of ``answers[i]`` given image i and question i (B,)."""
        raise NotImplementedError(f"{type(self).__name__} does not do VQA")


@dataclass
class Turn:
    """One exchange of a prompt: the user's text, the model's reply (None for the turn it must answer), and
    whether an image goes with it (text-only few-shot demonstrations have ``image=False``)."""

    user: str
    assistant: str | None = None
    image: bool = True


class VLM(nn.Module, ABC):
    """Task-agnostic model contract: tasks build prompts with ``format_prompt`` and call ``generate``,
    ``loss``, ``embed`` or ``zero_shot_logits``; pixels enter in [0, 1] at ``resolution`` and are normalised
    inside the model, once."""

    resolution: int
    family: str
    capabilities: frozenset[str] = frozenset()

    def to_pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(B, 3, R, R) floats in [0, 1] at the model's resolution, before any attack."""
        from evaluators.vlms.pixels import resize_square

        return torch.stack([resize_square(im, self.resolution) for im in images])

    @abstractmethod
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D) L2-normalised image embedding (DiffCAP's phi)."""

    def format_prompt(self, turns: Sequence[Turn]) -> str:
        raise NotImplementedError(f"{type(self).__name__} has no prompt format")

    def generate(self, x: torch.Tensor, prompts: Sequence[str], **decoding) -> list[str]:
        raise NotImplementedError(f"{type(self).__name__} does not generate text")

    def loss(self, x: torch.Tensor, prompts: Sequence[str], targets: Sequence[str]) -> torch.Tensor:
        """(B,) per-sample mean cross-entropy of the target tokens only, differentiable in x."""
        raise NotImplementedError(f"{type(self).__name__} has no text loss")

    def zero_shot_logits(self, x: torch.Tensor, classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
        """(B, C) zero-shot logits, differentiable in x."""
        raise NotImplementedError(f"{type(self).__name__} does not do zero-shot classification")
