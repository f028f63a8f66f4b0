"""Zero-shot image classification scored with top-1 accuracy, attacked with RobustVLM's protocol.

Attack (``objective``): RobustVLM evaluates zero-shot classification with AutoAttack's custom version,
attacks ["apgd-ce", "apgd-t"], and the harness runs the same by default (``ZERO_SHOT``; a run overrides it
with ``attack.zero_shot``, for any ``attack.schedule``):

- APGD-CE: maximise the cross-entropy w.r.t. the true label; 5 restarts, each from its own random start,
  first step 2 eps, each restart only on the images not yet misclassified;
- APGD-T: one run per target class (1 restart, random start, first step 2 eps), the targets being the
  classes with the 2nd..(k+1)-th highest logit at the clean image, k = min(9, classes - 1); only APGD-CE
  when there are at most 2 classes. Each targeted run maximises minus the targeted DLR loss

      loss = -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12)

  with z the logits, y the true class, t the target and z_pi1 >= z_pi2 >= ... the sorted logits (with
  fewer than four classes the denominator is z_pi1 - z_piC + 1e-12).

The iteration count is the attack's ``steps`` (100 in RobustVLM). ``initial_step`` / ``random_start`` set to
None take the attack's own values (BPDA+EOT runs ``attacks: [apgd-ce]`` with one restart). Where the targets
come from: the logits at ``x_clean`` when the caller passes it, else at the first point the objective
evaluates a sample (its ``score``, which every attack calls on the clean images first).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from attacks.base import Objective, Stage
from attacks.config import ZERO_SHOT_ATTACKS
from evaluators.datasets.base import SampleSource
from evaluators.errors import ConfigError
from evaluators.metrics.accuracy import top1
from evaluators.tasks.base import Task
from evaluators.vlms.base import VLM, VLMAdapter

log = logging.getLogger(__name__)

#: RobustVLM's zero-shot protocol (AutoAttack custom ["apgd-ce", "apgd-t"])
ZERO_SHOT: dict[str, Any] = {"attacks": ["apgd-ce", "apgd-t"], "ce_restarts": 5, "target_classes": 9,
                             "initial_step": 2.0, "random_start": True}


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

    def objective(self, vlm: VLMAdapter, batch: list[dict[str, Any]], schedule: str,
                  x_clean: torch.Tensor | None = None, protocol: dict[str, Any] | None = None) -> Objective:
        """``protocol``: overrides of ``ZERO_SHOT`` (``attack.zero_shot``); ``x_clean`` (optional): the batch's
        clean images, to rank the APGD-T targets up front."""
        if schedule not in ("single", "ensemble"):
            raise ValueError(f"schedule must be 'single' or 'ensemble', got {schedule!r}")
        proto = {**ZERO_SHOT, **(protocol or {})}
        unknown = [a for a in proto["attacks"] if a not in ZERO_SHOT_ATTACKS]
        if unknown or not proto["attacks"]:
            raise ValueError(f"attack.zero_shot.attacks must be a non-empty subset of {list(ZERO_SHOT_ATTACKS)}, "
                             f"got {list(proto['attacks'])}")
        labels = torch.tensor([int(s["label"]) for s in batch], dtype=torch.long)
        n_targets = min(int(proto["target_classes"]), len(self.classnames) - 1)
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

        run = {"initial_step": proto["initial_step"], "random_start": proto["random_start"]}
        stages = []
        if "apgd-ce" in proto["attacks"]:
            stages.append(Stage("ce", ce, restarts=int(proto["ce_restarts"]), **run))
        if "apgd-t" in proto["attacks"] and len(self.classnames) > 2:
            stages += [Stage(f"dlr-target-{k + 1}", dlr_target(k), targeted=True, target=k, **run)
                       for k in range(1, n_targets + 1)]
        if not stages:
            raise ValueError(f"attack.zero_shot.attacks={list(proto['attacks'])} leaves no stage for "
                             f"{len(self.classnames)} classes")

        def score(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
            rows = [int(r) for r in index.tolist()]
            with torch.no_grad():
                z = self.logits(vlm, x)
            remember(rows, z)
            return (z.argmax(dim=1).cpu() == labels[rows]).float().to(x.device)

        def judge(draws: list[torch.Tensor], index: torch.Tensor) -> torch.Tensor:
            """DiffPure's verdict: logits averaged over the purification draws, then top-1."""
            rows = [int(r) for r in index.tolist()]
            with torch.no_grad():
                z = torch.stack([self.logits(vlm, d).float() for d in draws]).mean(0)
            return (z.argmax(dim=1).cpu() == labels[rows]).float()

        return Objective(stages=stages, score=score, success_below=0.0, judge=judge,
                         extra={"schedule": "zero_shot", "protocol": proto, "metric": "top1"})

    def references(self, sample: dict[str, Any]) -> dict[str, Any]:
        """``{"label": int, "classname": str}``: with ``id`` this rebuilds what ``aggregate`` reads."""
        label = int(sample["label"])
        return {"label": label, "classname": self.classnames[label]}
