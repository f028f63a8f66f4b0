"""The contract of a task: how to call the VLM, score one sample, aggregate, and what to attack."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

from attacks.base import Objective
from evaluators.datasets.base import SampleSource
from evaluators.vlms.base import VLMAdapter


class Task(ABC):
    """One task over one data set. ``batch`` is the list of annotation dicts from ``SampleSource.get``."""

    #: "captioning" | "vqa" | "classification"
    name: str
    #: name of the headline metric in ``aggregate``'s output, e.g. "cider", "vqa_acc", "top1"
    primary: str

    def __init__(self, source: SampleSource):
        self.source = source

    def prepare(self, ids: list[str]) -> None:  # noqa: B027 (optional hook)
        """Called once with the evaluated subset (e.g. CIDEr takes its idf from the subset's references)."""

    @abstractmethod
    def predict(self, vlm: VLMAdapter, x: torch.Tensor, batch: list[dict[str, Any]]) -> list[Any]:
        """Model outputs for a batch, JSON-serialisable (strings, or class indices)."""

    @abstractmethod
    def score(self, predictions: list[Any], batch: list[dict[str, Any]]) -> list[dict[str, float]]:
        """Per-sample metrics, e.g. {"vqa_acc": 0.6}. Must contain ``self.primary``."""

    @abstractmethod
    def aggregate(self, predictions: dict[str, Any], samples: dict[str, dict[str, Any]]) -> dict[str, float]:
        """Corpus-level metrics from predictions keyed by sample id (CIDEr is not a mean of per-sample values)."""

    @abstractmethod
    def objective(self, vlm: VLMAdapter, batch: list[dict[str, Any]], schedule: str,
                  x_clean: torch.Tensor | None = None, protocol: dict[str, Any] | None = None) -> Objective:
        """What to attack. ``schedule``: "single" (one APGD run against the first reference) or "ensemble"
        (RobustVLM's schedule for this task). ``x_clean``: the batch's clean images, for tasks whose targets
        depend on the clean prediction (APGD-T's target classes). ``protocol``: ``attack.zero_shot``, read by
        zero-shot classification (RobustVLM's AutoAttack protocol), ignored by the other tasks."""

    def inputs(self, sample: dict[str, Any]) -> dict[str, Any]:
        """The non-image inputs written into samples.jsonl (e.g. the question)."""
        return {}

    def references(self, sample: dict[str, Any]) -> Any:
        """The references written into samples.jsonl (captions, answers or label)."""
        return None
