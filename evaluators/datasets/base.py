"""The contract of a task's data set: stable string ids, annotations, and an image path per sample."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from evaluators.errors import DataError  # noqa: F401 (re-exported: defined with the other errors)


class SampleSource(ABC):
    """A list of samples of one task. Images are not decoded here: the runner loads them, so a corrupt
    image is skipped and recorded instead of crashing a run."""

    @property
    @abstractmethod
    def ids(self) -> list[str]:
        """All sample ids in a fixed, documented order (the subset is drawn from this list)."""

    @abstractmethod
    def get(self, sample_id: str) -> dict[str, Any]:
        """Annotations of one sample: always ``id`` and ``image_path``; plus, by task,
        ``captions`` (list[str]) / ``question`` and ``answers`` (10 strings) / ``label`` (int)."""

    #: class names and zero-shot prompt templates ("{}" placeholder), for classification sources
    classnames: list[str] | None = None
    templates: list[str] | None = None
    #: which images the evaluated subset is drawn from (recorded in the manifest)
    pool: str = "all samples of the evaluated split"

    def demonstrations(self) -> list[dict[str, Any]]:
        """The train-split pool for in-context demonstrations (OpenFlamingo's zero-shot prompts): each
        ``{"caption": str}`` (caption sets) or ``{"question": str, "answer": str}`` (VQA sets).
        Raises DataError naming the missing train-side file."""
        raise DataError(f"{type(self).__name__} has no train split to draw demonstrations from")


def require_file(path: str | Path, what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{what} not found at {p}; put the file there or set the dataset path in the config")
    return p


def require_dir(path: str | Path, what: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise DataError(f"{what} not found at {p}; put the folder there or set the dataset path in the config")
    return p
