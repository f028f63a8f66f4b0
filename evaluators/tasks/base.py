"""The contract of a task: how to prompt and call the VLM, score one sample, aggregate, and what to attack.

Tasks own the prompts: each task config holds one template per model family (``prompts.<family>``, see
``evaluators.tasks.prompting``); the task turns a sample into ``Turn``s, the model frames them
(``vlm.format_prompt``), and the exact string sent is recorded per sample (``inputs()["prompt"]``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from attacks.base import Objective
from evaluators.datasets.base import SampleSource
from evaluators.errors import ConfigError
from evaluators.tasks.prompting import PromptTemplate, TaskPrompts
from evaluators.vlms.base import VLM, Turn, VLMAdapter


class Task(ABC):
    """One task over one data set. ``batch`` is the list of annotation dicts from ``SampleSource.get``."""

    #: "captioning" | "vqa" | "classification"
    name: str
    #: name of the headline metric in ``aggregate``'s output, e.g. "cider", "vqa_acc", "top1"
    primary: str

    def __init__(self, source: SampleSource, prompts: Mapping[str, Any] | None = None, demo_seed: int = 0):
        """``prompts``: family -> template node (config ``dataset.tasks.<task>.prompts``); ``demo_seed``:
        seeds the choice of demonstrations per sample (the runner passes ``seed.subset``)."""
        self.source = source
        self.prompts = TaskPrompts(self.name, prompts, demo_seed)
        self._sent: dict[str, str] = {}  # sample id -> the last prompt string sent for it
        self._demo_pool: list[dict[str, Any]] | None = None

    def prepare(self, ids: list[str]) -> None:  # noqa: B027 (optional hook)
        """Called once with the evaluated subset (e.g. CIDEr takes its idf from the subset's references)."""

    @abstractmethod
    def predict(self, vlm: VLM, x: torch.Tensor, batch: list[dict[str, Any]]) -> list[Any]:
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
        """The non-image inputs written into samples.jsonl: the prompt sent for the sample, when one was."""
        prompt = self._sent.get(str(sample["id"]))
        return {} if prompt is None else {"prompt": prompt}

    def references(self, sample: dict[str, Any]) -> Any:
        """The references written into samples.jsonl (captions, answers or label)."""
        return None

    # --------------------------------------------------------------------------------------- prompting

    def prompt_fields(self, sample: dict[str, Any]) -> dict[str, Any]:
        """The values a template's ``user`` pattern may use (e.g. ``question``)."""
        return {}

    def demo_turn(self, template: PromptTemplate, demo: dict[str, Any]) -> Turn:
        """A text-only demonstration turn from one entry of ``source.demonstrations()``."""
        raise ConfigError(f"the {self.name} task has no demonstrations; set its prompts' demonstrations to 0")

    def _user_text(self, template: PromptTemplate, fields: dict[str, Any]) -> str:
        try:
            return template.user.format(**fields)
        except (KeyError, IndexError) as e:
            raise ConfigError(f"dataset.tasks.{self.name}.prompts: template {template.user!r} uses {e}, but "
                              f"the {self.name} task offers only {sorted(fields)}") from None

    def demonstration_pool(self) -> list[dict[str, Any]]:
        """The data set's train-split demonstrations (read once)."""
        if self._demo_pool is None:
            self._demo_pool = list(self.source.demonstrations())
        return self._demo_pool

    def build_prompt(self, vlm: VLM, sample: dict[str, Any]) -> str:
        """The exact string sent to ``vlm`` for ``sample`` (recorded for ``inputs``)."""
        tpl = self.prompts.template(vlm.family)
        turns: list[Turn] = []
        if tpl.demonstrations:
            demos = self.prompts.pick_demonstrations(self.demonstration_pool(), str(sample["id"]), tpl.demonstrations)
            turns += [self.demo_turn(tpl, d) for d in demos]
        turns.append(Turn(user=self._user_text(tpl, self.prompt_fields(sample))))
        prompt = vlm.format_prompt(turns)
        self._sent[str(sample["id"])] = prompt
        return prompt

    def build_prompts(self, vlm: VLM, batch: Sequence[dict[str, Any]]) -> list[str]:
        return [self.build_prompt(vlm, s) for s in batch]

    def generate(self, vlm: VLM, x: torch.Tensor, batch: Sequence[dict[str, Any]]) -> list[str]:
        """The model's post-processed answers for a batch, with the family's decoding settings."""
        tpl = self.prompts.template(vlm.family)
        with torch.no_grad():
            raw = vlm.generate(x, self.build_prompts(vlm, batch), **tpl.decoding)
        return [tpl.postprocess(str(r)) for r in raw]

    def target_loss(self, vlm: VLM, x: torch.Tensor, pairs: Sequence[tuple[str, str]]) -> torch.Tensor:
        """(B,) cross-entropy of each (prompt, target) pair's target given image i; differentiable in x."""
        return vlm.loss(x, [p for p, _ in pairs], [t for _, t in pairs])
