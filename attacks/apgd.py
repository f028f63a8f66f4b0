"""APGD, L-infinity (Croce and Hein 2020, "Reliable evaluation of adversarial robustness with an ensemble of
diverse parameter-free attacks"), on any per-sample loss of the images.

Follows AutoAttack's ``APGDAttack.attack_single_run`` (and torchattacks' copy of it) step for step:

- the update ``z = P(x_k + eta sign(g))``, ``x_{k+1} = P(x_k + alpha (z - x_k) + (1 - alpha)(x_k - x_{k-1}))``
  with ``alpha = 1`` at the first iteration and ``step_weight`` (alpha, 0.75) after; ``1 - alpha`` is the
  momentum;
- step-size checks after ``max(int(0.22 n), 1)`` iterations, then windows shrinking by ``max(int(0.03 n), 1)``
  down to ``max(int(0.06 n), 1)`` (the integer form of the paper's p_j; 22, 41, 57, 70, 80, 87, 93, 99 for
  n = 100); at a check the step is halved where the loss rose in at most ``rho`` of the window's steps, or
  where the previous check did not halve and the best loss did not improve since; halved samples restart
  from the best point with its gradient; the momentum term then still uses the iterate before the restart;
- random start ``x + eps * t / max|t|``, ``t ~ U[-1, 1]``, clipped to [0, 1];
- the returned image is the best-loss iterate.

Differences: the first window counts a rise when the first iterate's loss exceeds the loss at the starting
point (AutoAttack compares it with an unfilled zero entry of its loss history, the same test for a positive
loss); ``initial_step`` (2 eps in AutoAttack, 1 eps in RobustVLM's captioning/VQA attacks) and
``random_start`` are configuration values; ``observe`` lets a caller judge every iterate (DiffPure's verdict).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

#: A loss: ``loss_fn(x, index) -> (B,)`` differentiable in x, or ``-> ((B,), grad)`` with its own gradient.
#: observe(k, x_k, index): called with the starting point (k = 0) and every iterate (k = 1..steps)
Observer = Callable[[int, torch.Tensor, torch.Tensor], None]


def checkpoints(steps: int) -> list[int]:
    """Iteration counts after which the step size is checked (AutoAttack's integer schedule)."""
    k, k_min, decr = max(int(0.22 * steps), 1), max(int(0.06 * steps), 1), max(int(0.03 * steps), 1)
    marks, at = [], 0
    while at + k <= steps:
        at += k
        marks.append(at)
        k = max(k - decr, k_min)
    return marks


def random_start(x: torch.Tensor, eps: float, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """AutoAttack's L-inf random start: ``x + eps * t / max|t|`` with ``t ~ U[-1, 1]``, clipped to [0, 1]."""
    t = torch.stack([2 * torch.rand(x.shape[1:], generator=g) - 1 for g in generators]).to(x)
    scale = t.flatten(1).abs().amax(1).view(-1, *([1] * (x.dim() - 1)))
    return (x + eps * t / scale).clamp(0.0, 1.0)


class APGD:
    """Maximises ``loss_fn(x, index) -> (B,)`` over the L-inf ball of radius ``eps`` intersected with [0, 1]."""

    def __init__(self, eps: float, steps: int = 100, initial_step: float = 2.0, random_start: bool = False,
                 step_weight: float = 0.75, rho: float = 0.75, dtype: str = "float32", seed: int = 0):
        if not 0 < eps * 255 <= 64 + 1e-9:
            raise ValueError(f"attack.eps is in 1/255 units and must be in (0, 64], got {eps * 255:g}")
        if steps < 1:
            raise ValueError(f"attack.steps must be >= 1, got {steps}")
        if dtype not in DTYPES:
            raise ValueError(f"attack dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if not 0 < step_weight <= 1:
            raise ValueError(f"attack step_weight (alpha, weight of the new step) must be in (0, 1], got {step_weight}")
        self.eps, self.steps, self.initial_step = float(eps), int(steps), float(initial_step)
        self.random_start, self.step_weight, self.rho = bool(random_start), float(step_weight), float(rho)
        self.dtype, self.seed = dtype, int(seed)

    def variant(self, dtype: str | None = None, initial_step: float | None = None,
                random_start: bool | None = None) -> APGD:
        """The same attack with some settings replaced (None keeps this attack's value)."""
        return APGD(self.eps, self.steps, self.initial_step if initial_step is None else initial_step,
                    self.random_start if random_start is None else random_start, self.step_weight, self.rho,
                    self.dtype if dtype is None else dtype, self.seed)

    def _loss_and_grad(self, loss_fn: Callable, x: torch.Tensor, index: torch.Tensor):
        x = x.detach().requires_grad_(True)
        dtype = DTYPES[self.dtype]
        with torch.enable_grad():
            if dtype is torch.float32:
                loss = loss_fn(x, index)
            else:
                with torch.autocast(device_type=x.device.type, dtype=dtype):
                    loss = loss_fn(x, index)
            grad = None
            if isinstance(loss, tuple):  # (loss, grad): the loss accumulated its own gradient (EOT per draw)
                loss, grad = loss
            loss = loss.float()
            if loss.shape != (x.shape[0],):
                raise ValueError(f"the attack loss must be per sample, shape ({x.shape[0]},), got {tuple(loss.shape)}")
            if grad is None:
                (grad,) = torch.autograd.grad(loss.sum(), x)
        return loss.detach(), grad.detach().float().contiguous()

    def perturb(self, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor,
                index: torch.Tensor | None = None, x_init: torch.Tensor | None = None,
                generators: Sequence[torch.Generator] | None = None, observe: Observer | None = None,
                trace: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Best iterate per sample (float32, inside the eps-ball around ``x`` and [0, 1]) and its loss.

        Start: ``x_init`` if given, else a random start (one generator per sample; ``self.seed`` if none) when
        ``random_start``, else ``x``. ``trace`` (a dict) receives per-iteration "loss" and "step" (B,) lists.
        """
        x = x.detach().float()
        if x.min() < 0 or x.max() > 1:
            log.warning("attack input outside [0, 1] (min %.4g, max %.4g): images must be pixels in [0, 1]",
                        float(x.min()), float(x.max()))
        n = x.shape[0]
        index = torch.arange(n, device=x.device) if index is None else index
        lo, hi = (x - self.eps).clamp(0, 1), (x + self.eps).clamp(0, 1)

        def project(v: torch.Tensor) -> torch.Tensor:
            return torch.minimum(torch.maximum(v, lo), hi)

        if x_init is not None:
            x_cur = project(x_init.detach().float())
        elif self.random_start:
            if generators is None:
                generators = [torch.Generator().manual_seed(self.seed + i) for i in range(n)]
            x_cur = project(random_start(x, self.eps, generators))
        else:
            x_cur = x.clone()
        if observe is not None:
            observe(0, x_cur, index)
        loss, grad = self._loss_and_grad(loss_fn, x_cur, index)
        zero = grad.flatten(1).abs().amax(1) == 0
        if zero.any():
            log.warning("zero gradient for %d of %d samples at the start: the loss may be masked or saturated",
                        int(zero.sum()), n)
        x_best, loss_best, grad_best = x_cur.clone(), loss.clone(), grad.clone()
        step = torch.full((n,), self.initial_step * self.eps, device=x.device)
        x_prev = x_cur.clone()
        loss_prev = loss.clone()
        rises = torch.zeros(n, device=x.device)
        marks = checkpoints(self.steps)
        last_mark = 0
        loss_best_at_mark = loss_best.clone()
        halved_at_mark = torch.ones(n, dtype=torch.bool, device=x.device)
        if trace is not None:
            trace.update(loss=[loss.clone()], step=[step.clone()])

        for k in range(self.steps):
            s = step.view(-1, *([1] * (x.dim() - 1)))
            z = project(x_cur + s * grad.sign())
            a = 1.0 if k == 0 else self.step_weight
            x_next = project(x_cur + (z - x_cur) * a + (x_cur - x_prev) * (1 - a))
            x_prev, x_cur = x_cur, x_next
            if observe is not None:
                observe(k + 1, x_cur, index)
            loss, grad = self._loss_and_grad(loss_fn, x_cur, index)
            if trace is not None:
                trace["loss"].append(loss.clone())
                trace["step"].append(step.clone())
            rises += (loss > loss_prev).float()
            loss_prev = loss
            better = loss > loss_best
            x_best[better], loss_best[better], grad_best[better] = x_cur[better], loss[better], grad[better]
            if k + 1 in marks:
                window = k + 1 - last_mark
                oscillating = rises <= self.rho * window
                stalled = ~halved_at_mark & (loss_best_at_mark >= loss_best)
                halve = oscillating | stalled
                step[halve] /= 2
                x_cur[halve], grad[halve] = x_best[halve], grad_best[halve]
                halved_at_mark, loss_best_at_mark = halve, loss_best.clone()
                rises.zero_()
                last_mark = k + 1
        return project(x_best), loss_best
