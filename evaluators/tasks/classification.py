"""Zero-shot image classification scored with top-1 accuracy, attacked with APGD-CE and APGD-T.

Attack schedules (``objective``):

- ``"single"``: APGD-CE, i.e. maximise the cross-entropy of the logits w.r.t. the true label;
- ``"ensemble"``: APGD-CE, then APGD-T (Croce and Hein 2020): one targeted stage per target class, the
  targets being the classes with the 2nd..10th highest logit at the reference point (fewer when there
  are fewer classes). Each targeted stage maximises minus the targeted DLR loss

      loss = -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12)

  with z the logits, y the true class, t the target and z_pi1 >= z_pi2 >= ... the sorted logits (with
  fewer than four classes the denominator is z_pi1 - z_piC + 1e-12).

Where the targets come from: APGD-T ranks the classes by the logits of the image it starts from (the
clean image). ``objective`` does not see the images, so the ranking is taken from the logits at the first
point the objective evaluates a sample (its ``score`` or any stage's loss; an attack evaluates the clean
image first), or from ``x_clean`` when the caller passes it. All targeted stages share that ranking, so
the targets are distinct.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from attacks.base import Objective, Stage
from evaluators.datasets.base import SampleSource
from evaluators.errors import ConfigError
from evaluators.metrics.accuracy import top1
from evaluators.tasks.base import Task
from evaluators.vlms.base import VLM, VLMAdapter

log = logging.getLogger(__name__)

#: APGD-T's number of target classes (AutoAttack's standard setting)
N_TARGET_CLASSES = 9


def targeted_dlr(logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Minus the targeted DLR loss of Croce and Hein (2020), per sample: the quantity APGD-T maximises."""
    z = logits.float()
    zs = z.sort(dim=1, descending=True).values
    if z.shape[1] >= 4:
        denom = zs[:, 0] - 0.5 * (zs[:, 2] + zs[:, 3]) + 1e-12
    else:
        denom = zs[:, 0] - zs[:, -1] + 1e-12
    z_y = z.gather(1, labels[:, None]).squeeze(1)
    z_t = z.gather(1, targets[:, None]).squeeze(1)
    return -(z_y - z_t) / denom


class ClassificationTask(Task):
    """Caltech101 / ImageNet zero-shot classification; headline metric: top-1 x100.

    ``templates``: the data set's prompt templates (e.g. "a photo of a {}."); None takes the source's
    ``templates``. Each class embedding is the normalised mean over them (``vlm.zero_shot_logits``).
    """

    name = "classification"
    primary = "top1"

    def __init__(self, source: SampleSource | None, templates: Sequence[str] | None = None, demo_seed: int = 0):
        """``source=None`` builds a scorer only (re-scoring from samples.jsonl needs no class names);
        ``demo_seed`` is accepted like every task's (zero-shot classification has no demonstrations)."""
        super().__init__(source, demo_seed=demo_seed)
        if source is not None and not source.classnames:
            raise ValueError(f"{type(source).__name__} has no classnames; classification needs them")
        if templates is None and source is not None:
            templates = getattr(source, "templates", None)  # the data set's own templates travel with its source
        if source is not None and not templates:
            raise ConfigError("dataset.tasks.classification has no templates (neither on the task nor on its "
                              "source); zero-shot classification needs prompt templates such as 'a photo of a {}.'")
        self.classnames: list[str] = list(source.classnames) if source is not None else []
        self.templates = list(templates) if templates is not None else None

    def logits(self, vlm: VLM, x: torch.Tensor) -> torch.Tensor:
        """Zero-shot logits (B, C), differentiable in x."""
        return vlm.zero_shot_logits(x, self.classnames, self.templates or [])

    def predict(self, vlm: VLM, x: torch.Tensor, batch: list[dict[str, Any]]) -> list[int]:
        with torch.no_grad():
            return [int(c) for c in self.logits(vlm, x).argmax(dim=1).tolist()]

    def score(self, predictions: list[Any], batch: list[dict[str, Any]]) -> list[dict[str, float]]:
        if len(predictions) != len(batch):
            raise ValueError(f"{len(predictions)} predictions for {len(batch)} samples")
        return [{"top1": float(int(p) == int(s["label"]))} for p, s in zip(predictions, batch, strict=True)]

    def aggregate(self, predictions: dict[str, Any], samples: dict[str, dict[str, Any]]) -> dict[str, float]:
        if not predictions:
            raise ValueError("no predictions to aggregate")
        labels = []
        for i in predictions:
            sample = samples.get(i)
            labels.append(int((sample if sample is not None and "label" in sample else self.source.get(i))["label"]))
        return {"top1": 100.0 * top1([int(p) for p in predictions.values()], labels)}

    def objective(
        self,
        vlm: VLMAdapter,
        batch: list[dict[str, Any]],
        schedule: str,
        x_clean: torch.Tensor | None = None,
    ) -> Objective:
        """``x_clean`` (optional): the batch's clean images, to rank the APGD-T targets up front."""
        if schedule not in ("single", "ensemble"):
            raise ValueError(f"schedule must be 'single' or 'ensemble', got {schedule!r}")
        labels = torch.tensor([int(s["label"]) for s in batch], dtype=torch.long)
        n_targets = min(N_TARGET_CLASSES, len(self.classnames) - 1)
        ranking: dict[int, torch.Tensor] = {}  # batch row -> classes by decreasing reference logit

        def remember(rows: list[int], z: torch.Tensor) -> None:
            order = z.detach().float().argsort(dim=1, descending=True).cpu()
            for j, r in enumerate(rows):
                ranking.setdefault(r, order[j])

        if x_clean is not None:
            with torch.no_grad():
                remember(list(range(len(batch))), self.logits(vlm, x_clean))

        def ce(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
            rows = [int(r) for r in index.tolist()]
            z = self.logits(vlm, x)
            remember(rows, z)
            return F.cross_entropy(z.float(), labels[rows].to(z.device), reduction="none")

        def dlr_target(k: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
            def loss(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
                rows = [int(r) for r in index.tolist()]
                z = self.logits(vlm, x)
                remember(rows, z)
                t = torch.stack([ranking[r][k] for r in rows]).to(z.device)
                return targeted_dlr(z, labels[rows].to(z.device), t)

            return loss

        stages = [Stage("ce", ce)]
        if schedule == "ensemble":
            stages += [Stage(f"dlr-target-{k + 1}", dlr_target(k), targeted=True) for k in range(1, n_targets + 1)]

        def score(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
            rows = [int(r) for r in index.tolist()]
            with torch.no_grad():
                z = self.logits(vlm, x)
            remember(rows, z)
            return (z.argmax(dim=1).cpu() == labels[rows]).float().to(x.device)

        return Objective(stages=stages, score=score, success_below=0.0,
                         extra={"schedule": schedule, "metric": "top1"})

    def references(self, sample: dict[str, Any]) -> dict[str, Any]:
        """``{"label": int, "classname": str}``: with ``id`` this rebuilds what ``aggregate`` reads."""
        label = int(sample["label"])
        return {"label": label, "classname": self.classnames[label]}
