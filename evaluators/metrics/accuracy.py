"""Top-1 accuracy for zero-shot classification (per sample, so robustness can be read per image)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def top1_correct(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """1.0 where the arg-max class equals the label, else 0.0; shape (B,). No gradient."""
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"need logits (B, C) and labels (B,), got {tuple(logits.shape)} and {tuple(labels.shape)}")
    return (logits.detach().argmax(dim=1) == labels.to(logits.device)).float()


def top1(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Fraction in [0, 1] of predicted class indices equal to the labels."""
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    if len(labels) == 0:
        raise ValueError("top-1 accuracy of an empty set")
    return sum(int(p) == int(y) for p, y in zip(predictions, labels, strict=True)) / len(labels)
