"""What an attack sees of a task, the one call shape of every attack, and the threat-model invariants."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from diffcap.base import Purifier
from evaluators.errors import InvariantError

#: loss(x, index) -> per-sample loss (len(index),) to MAXIMISE; ``x`` holds the images of the batch rows
#: listed in ``index`` (a LongTensor into the batch), so a task can slice its per-sample targets.
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: score(x, index) -> per-sample task metric (len(index),); lower means the attack did better.
ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Stage:
    """One APGD run (or ``restarts`` runs) of an attack schedule, e.g. one ground-truth caption or target class.

    ``initial_step`` / ``random_start`` / ``dtype``: None takes the attack's configured value. ``target``: what
    the stage attacks (e.g. the caption index), remembered per image when the stage does best. A stage with
    ``follow_best`` builds its loss per image from those targets: ``follow_best(targets_by_row) -> LossFn``,
    where a row's target is None while no stage improved on the clean image (RobustVLM's final fp32 stage).
    """

    name: str
    loss: LossFn | None = None
    targeted: bool = False  # informational: the loss already has the sign the attack maximises
    dtype: str | None = None  # "float16" / "bfloat16" / "float32"; None = the attack's default
    start: str = "clean"  # "clean": at (or randomly around) the clean image; "best": at the best image so far
    restarts: int = 1
    initial_step: float | None = None
    random_start: bool | None = None
    target: Any = None
    follow_best: Callable[[list[Any]], LossFn] | None = None

    def __post_init__(self):
        if (self.loss is None) == (self.follow_best is None):
            raise ValueError(f"stage {self.name!r} needs exactly one of loss and follow_best")
        if self.start not in ("clean", "best"):
            raise ValueError(f"stage {self.name!r}: start must be 'clean' or 'best', got {self.start!r}")
        if self.restarts < 1:
            raise ValueError(f"stage {self.name!r}: restarts must be >= 1, got {self.restarts}")


@dataclass
class Objective:
    """Everything an attack needs about one batch of one task, built by the task from the VLM."""

    stages: list[Stage]
    score: ScoreFn
    #: a sample counts as broken (no more attack stages) once its score is <= this value
    success_below: float | None = None
    extra: dict = field(default_factory=dict)
    #: judge(list of purified versions of x, index) -> per-sample draw-averaged score; None = mean of ``score``
    judge: Callable[[list[torch.Tensor], torch.Tensor], torch.Tensor] | None = None

    def verdict(self, draws: list[torch.Tensor], index: torch.Tensor) -> torch.Tensor:
        """Draw-averaged score of several purification draws of the same images (DiffPure's verdict)."""
        if self.judge is not None:
            return self.judge(draws, index)
        return torch.stack([self.score(d, index).float() for d in draws]).mean(0)


def check_invariants(x_adv: torch.Tensor, x: torch.Tensor, eps: float, tol: float = 1e-6) -> list[dict]:
    """Per-sample L-inf distance, range and ``ok`` flag; never raises (``enforce_invariants`` does).

    ``eps`` is in [0, 1] pixel units (configs write it in 1/255 units and convert).
    """
    if x_adv.shape != x.shape:
        raise InvariantError(f"adversarial batch has shape {tuple(x_adv.shape)}, the clean one {tuple(x.shape)}")
    d = (x_adv.float() - x.float()).flatten(1).abs().amax(1)
    lo = x_adv.float().flatten(1).amin(1)
    hi = x_adv.float().flatten(1).amax(1)
    finite = torch.isfinite(x_adv.float()).flatten(1).all(1)
    rows = []
    for i in range(x.shape[0]):
        ok = bool(finite[i] and d[i] <= eps + tol and lo[i] >= 0.0 and hi[i] <= 1.0)
        rows.append({"linf_255": float(d[i]) * 255.0, "min": float(lo[i]), "max": float(hi[i]), "ok": ok})
    return rows


def enforce_invariants(rows: Sequence[dict], eps: float, ids: Sequence[str] | None = None) -> None:
    """Raise InvariantError naming every sample whose row is not ``ok``: the run must stop there."""
    bad = [i for i, r in enumerate(rows) if not r["ok"]]
    if bad:
        names = [str(ids[i]) if ids is not None else str(i) for i in bad]
        r = rows[bad[0]]
        raise InvariantError(
            f"{len(bad)} adversarial image(s) violate the threat model (eps={eps * 255:.6g}/255), e.g. "
            f"{names[0]}: ||delta||_inf={r['linf_255']:.6g}/255, range [{r['min']:.6g}, {r['max']:.6g}]; "
            f"samples: {', '.join(names[:10])}"
        )


class Attack(ABC):
    """Every attack: ``attack(objective, x, seeds, defense=None) -> (x_adv, per-sample info)``.

    ``seeds``: one per image (random starts and EOT draws are drawn from it, so an image's attack does not
    depend on its batch); ``defense``: the purifier, for adaptive attacks. ``__call__`` checks the inputs,
    times the attack, and enforces the eps-ball and the [0, 1] box on every returned image.
    """

    eps: float
    #: True when the attack differentiates through the defense (its cache key includes the defense)
    adaptive: bool = False

    @abstractmethod
    def run(self, objective: Objective, x: torch.Tensor, seeds: list[int],
            defense: Purifier | None) -> tuple[torch.Tensor, list[dict]]:
        """The adversarial images (same shape, float32) and one info dict per image."""

    def __call__(self, objective: Objective, x: torch.Tensor, seeds: Sequence[int],
                 defense: Purifier | None = None) -> tuple[torch.Tensor, list[dict]]:
        if x.dim() != 4 or not x.is_floating_point():
            raise ValueError(f"attack input must be a float (B, C, H, W) batch, got {x.dtype} {tuple(x.shape)}")
        if len(seeds) != x.shape[0]:
            raise ValueError(f"{len(seeds)} seeds for {x.shape[0]} images")
        if not objective.stages:
            raise ValueError("the objective has no attack stage")
        if self.adaptive and defense is None:
            raise ValueError(f"{type(self).__name__} attacks through a defense; none was given")
        tic = time.perf_counter()
        x = x.detach().float()
        x_adv, info = self.run(objective, x, [int(s) for s in seeds], defense)
        x_adv = x_adv.detach().float()
        if len(info) != x.shape[0]:
            raise RuntimeError(f"{type(self).__name__} returned {len(info)} info rows for {x.shape[0]} images")
        rows = check_invariants(x_adv, x, self.eps)
        enforce_invariants(rows, self.eps)
        seconds = (time.perf_counter() - tic) / x.shape[0]
        return x_adv, [{**i, **r, "seconds": seconds} for i, r in zip(info, rows, strict=True)]
