"""Visual question answering scored with VQA accuracy, attacked as in RobustVLM.

Attack schedules (``objective``):

- ``"single"``: maximise the answer cross-entropy of the most common ground-truth answer;
- ``"ensemble"``: the five most common answers in turn (``collections.Counter`` order of the raw answer
  strings, ties in annotator order, as RobustVLM ranks them; an image with fewer distinct answers skips
  the extra stages), then the most common answer again in float32, then two TARGETED stages in float32
  that push the answer towards "maybe" and towards "Word" (loss = minus the target's cross-entropy).
  The float32 untargeted stage starts from the best image so far and attacks, per question, the answer
  whose stage did best (the most common one while no stage improved on the clean image), as RobustVLM.

The attack stops on a question once its VQA accuracy is <= ``attack_success_below`` (0: wrong).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import torch

from attacks.base import Objective, Stage
from evaluators.datasets.base import SampleSource
from evaluators.metrics.vqa_accuracy import GT_NORMALISATIONS, vqa_accuracy
from evaluators.tasks.base import Task
from evaluators.tasks.captioning import per_sample_loss
from evaluators.tasks.prompting import PromptTemplate
from evaluators.vlms.base import VLM, Turn, VLMAdapter

log = logging.getLogger(__name__)

#: how many of the most common answers the ensemble schedule attacks with (RobustVLM: 5)
N_ENSEMBLE_ANSWERS = 5
#: RobustVLM's target strings for the targeted VQA stages
ENSEMBLE_TARGETS = ("maybe", "Word")


def ranked_answers(answers: list[str]) -> list[str]:
    """Distinct answers from most to least common (ties: first given first)."""
    return [a for a, _ in Counter(answers).most_common()]


class VQATask(Task):
    """VQAv2 / TextVQA; headline metric: mean VQA accuracy x100."""

    name = "vqa"
    primary = "vqa_acc"

    def __init__(self, source: SampleSource, gt_normalisation: str = "always", attack_success_below: float = 0.0,
                 prompts: Mapping[str, Any] | None = None, demo_seed: int = 0):
        super().__init__(source, prompts, demo_seed)
        if gt_normalisation not in GT_NORMALISATIONS:
            raise ValueError(f"gt_normalisation must be one of {GT_NORMALISATIONS}, got {gt_normalisation!r}")
        self.gt_normalisation = gt_normalisation
        self.attack_success_below = float(attack_success_below)

    def _accuracy(self, prediction: str, sample: dict[str, Any]) -> float:
        return vqa_accuracy(str(prediction), sample["answers"], self.gt_normalisation)

    def predict(self, vlm: VLM, x: torch.Tensor, batch: list[dict[str, Any]]) -> list[str]:
        return self.generate(vlm, x, batch)

    def prompt_fields(self, sample: dict[str, Any]) -> dict[str, Any]:
        return {"question": str(sample["question"])}

    def demo_turn(self, template: PromptTemplate, demo: dict[str, Any]) -> Turn:
        return Turn(user=self._user_text(template, {"question": str(demo["question"])}),
                    assistant=str(demo["answer"]), image=False)

    def score(self, predictions: list[Any], batch: list[dict[str, Any]]) -> list[dict[str, float]]:
        if len(predictions) != len(batch):
            raise ValueError(f"{len(predictions)} answers for {len(batch)} questions")
        return [{"vqa_acc": self._accuracy(p, s)} for p, s in zip(predictions, batch, strict=True)]

    def aggregate(self, predictions: dict[str, Any], samples: dict[str, dict[str, Any]]) -> dict[str, float]:
        """Mean accuracy x100 over the predicted questions (the official "overall" number)."""
        if not predictions:
            raise ValueError("no predictions to aggregate")
        accs = []
        for i, p in predictions.items():
            sample = samples.get(i)
            if sample is None or "answers" not in sample:
                sample = self.source.get(i)
            accs.append(self._accuracy(p, sample))
        return {"vqa_acc": 100.0 * sum(accs) / len(accs)}

    def objective(self, vlm: VLMAdapter, batch: list[dict[str, Any]], schedule: str,
                  x_clean: torch.Tensor | None = None, protocol: dict[str, Any] | None = None) -> Objective:
        if schedule not in ("single", "ensemble"):
            raise ValueError(f"schedule must be 'single' or 'ensemble', got {schedule!r}")
        questions = self.build_prompts(vlm, batch)  # the prompt strings (question + framing)
        ranked = [ranked_answers([str(a) for a in s["answers"]]) for s in batch]

        def answer_fn(sign: float) -> Callable[[torch.Tensor, list[tuple[str, str]]], torch.Tensor]:
            def fn(x: torch.Tensor, qa: list[tuple[str, str]]) -> torch.Tensor:
                return sign * self.target_loss(vlm, x, qa)

            return fn

        def untargeted(k: int | list[int]) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
            """Loss of the k-th most common answer, or of the k[r]-th for batch row r."""
            ks = k if isinstance(k, list) else [k] * len(questions)
            targets = [(q, r[j]) if j < len(r) else None for q, r, j in zip(questions, ranked, ks, strict=True)]
            fn = answer_fn(1.0)

            def loss(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
                return per_sample_loss(x, index, targets, fn)

            return loss

        def targeted(answer: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
            targets = [(q, answer) for q in questions]
            fn = answer_fn(-1.0)  # maximising minus the CE makes the target answer likely

            def loss(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
                return per_sample_loss(x, index, targets, fn)

            return loss

        if schedule == "single":
            stages = [Stage("answer-0", untargeted(0))]
        else:
            stages = [Stage(f"answer-{k}", untargeted(k), target=k) for k in range(N_ENSEMBLE_ANSWERS)]
            stages.append(Stage("answer-best-fp32", dtype="float32", start="best",
                                follow_best=lambda best: untargeted([0 if k is None else k for k in best])))
            stages += [Stage(f"target-{t}", targeted(t), targeted=True, dtype="float32") for t in ENSEMBLE_TARGETS]

        def score(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
            rows = [int(r) for r in index.tolist()]
            preds = self.generate(vlm, x, [batch[r] for r in rows])
            values = [self._accuracy(p, batch[r]) for p, r in zip(preds, rows, strict=True)]
            return torch.tensor(values, dtype=torch.float32, device=x.device)

        return Objective(stages=stages, score=score, success_below=self.attack_success_below,
                         extra={"schedule": schedule, "metric": "vqa_acc"})

    def inputs(self, sample: dict[str, Any]) -> dict[str, Any]:
        return {"question": sample["question"], **super().inputs(sample)}

    def references(self, sample: dict[str, Any]) -> dict[str, Any]:
        """``{"answers": [...], "answer_type": ...}``: with ``id`` and ``inputs`` this rebuilds what
        ``aggregate`` reads."""
        out: dict[str, Any] = {"answers": list(sample["answers"])}
        if "answer_type" in sample:
            out["answer_type"] = sample["answer_type"]
        return out
