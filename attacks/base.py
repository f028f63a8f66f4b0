"""What an attack sees of a task, and the invariants every adversarial image must satisfy."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from evaluators.errors import InvariantError  # noqa: F401 (re-exported: defined with the other errors)

#: loss(x, index) -> per-sample loss (len(index),) to MAXIMISE; ``x`` holds the images of the batch rows
#: listed in ``index`` (a LongTensor into the batch), so a task can slice its per-sample targets.
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: score(x, index) -> per-sample task metric (len(index),); lower means the attack did better.
ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Stage:
    """One APGD run of an attack schedule (e.g. one ground-truth caption, or one target class)."""

    name: str
    loss: LossFn
    targeted: bool = False  # informational: the loss already has the sign the attack maximises
    dtype: str | None = None  # "float16" / "bfloat16" / "float32"; None = the attack's default
    start: str = "clean"  # "clean": start at the clean image; "best": at the best adversarial image so far


@dataclass
class Objective:
    """Everything an attack needs about one batch of one task, built by the task from the VLM."""

    stages: list[Stage]
    score: ScoreFn
    #: a sample counts as broken (no more attack stages) once its score is <= this value
    success_below: float | None = None
    extra: dict = field(default_factory=dict)


def check_invariants(x_adv: torch.Tensor, x: torch.Tensor, eps: float, tol: float = 1e-6) -> list[dict]:
    """Per-sample L-inf distance and box check; raises InvariantError on any violation.

    ``eps`` is in [0, 1] pixel units (configs write it in 1/255 units and convert).
    """
    d = (x_adv.float() - x.float()).flatten(1).abs().amax(1)
    lo = x_adv.float().flatten(1).amin(1)
    hi = x_adv.float().flatten(1).amax(1)
    rows = []
    for i in range(x.shape[0]):
        ok = bool(d[i] <= eps + tol and lo[i] >= 0.0 and hi[i] <= 1.0)
        rows.append({"linf": float(d[i]), "linf_255": float(d[i]) * 255.0, "min": float(lo[i]),
                     "max": float(hi[i]), "ok": ok})
        if not ok:
            raise InvariantError(
                f"adversarial image {i} violates the threat model: ||delta||_inf={float(d[i]):.6g} "
                f"(eps={eps:.6g}), range [{float(lo[i]):.6g}, {float(hi[i]):.6g}]"
            )
    return rows
