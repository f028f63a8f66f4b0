"""APGD, L-infinity (Croce and Hein 2020, "Reliable evaluation of adversarial robustness with an ensemble of
diverse parameter-free attacks"), on any per-sample loss of the images.

Differences from the paper that are configuration values: ``initial_step`` (2 * eps in the paper, 1 * eps in
RobustVLM) and ``random_start`` (RobustVLM: none). After a step-size halving the iterate restarts from the best
point with its gradient and without momentum from before the restart.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def checkpoints(steps: int) -> list[int]:
    """Iterations at which the step size may be halved: p_0 = 0, p_1 = 0.22,
    p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), as iteration indices ceil(p_j * steps)."""
    p = [0.0, 0.22]
    while p[-1] < 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    marks = {math.ceil(q * steps - 1e-9) for q in p[1:]}  # tolerance: 0.41 * 100 is 41.000000000000007
    return sorted(m for m in marks if m <= steps)


class APGD:
    """Maximises ``loss_fn(x, index) -> (B,)`` over the L-inf ball of radius ``eps`` intersected with [0, 1]."""

    def __init__(self, eps: float, steps: int = 100, initial_step: float = 2.0, random_start: bool = False,
                 momentum: float = 0.75, rho: float = 0.75, dtype: str = "float32", seed: int = 0):
        if not 0 < eps * 255 <= 64 + 1e-9:
            raise ValueError(f"attack.eps is in 1/255 units and must be in (0, 64], got {eps * 255:g}")
        if steps < 1:
            raise ValueError(f"attack.steps must be >= 1, got {steps}")
        if dtype not in DTYPES:
            raise ValueError(f"attack dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.eps, self.steps, self.initial_step = float(eps), int(steps), float(initial_step)
        self.random_start, self.momentum, self.rho = bool(random_start), float(momentum), float(rho)
        self.dtype, self.seed = dtype, int(seed)

    def with_dtype(self, dtype: str | None) -> APGD:
        if dtype is None or dtype == self.dtype:
            return self
        return APGD(self.eps, self.steps, self.initial_step, self.random_start, self.momentum, self.rho,
                    dtype, self.seed)

    def _loss_and_grad(self, loss_fn: Callable, x: torch.Tensor, index: torch.Tensor):
        x = x.detach().requires_grad_(True)
        dtype = DTYPES[self.dtype]
        with torch.enable_grad():
            if dtype is torch.float32:
                loss = loss_fn(x, index)
            else:
                with torch.autocast(device_type=x.device.type, dtype=dtype):
                    loss = loss_fn(x, index)
            loss = loss.float()
            if loss.shape != (x.shape[0],):
                raise ValueError(f"the attack loss must be per sample, shape ({x.shape[0]},), got {tuple(loss.shape)}")
            (grad,) = torch.autograd.grad(loss.sum(), x)
        return loss.detach(), grad.detach().float().contiguous()

    def perturb(self, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor,
                index: torch.Tensor | None = None, x_init: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Best iterate per sample (float32, inside the eps-ball around ``x`` and [0, 1]) and its loss."""
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
            g = torch.Generator(device="cpu").manual_seed(self.seed)
            x_cur = project(x + (2 * torch.rand(x.shape, generator=g) - 1).to(x) * self.eps)
        else:
            x_cur = x.clone()
        loss, grad = self._loss_and_grad(loss_fn, x_cur, index)
        zero = grad.flatten(1).abs().amax(1) == 0
        if zero.any():
            log.warning("zero gradient for %d of %d samples at the start: the loss may be masked or saturated",
                        int(zero.sum()), n)
        x_best, loss_best, grad_best = x_cur.clone(), loss.clone(), grad.clone()
        step = torch.full((n,), self.initial_step * self.eps, device=x.device)
        x_prev = x_cur.clone()
        loss_prev = loss.clone()
        increases = torch.zeros(n, device=x.device)
        marks = checkpoints(self.steps)
        last_mark = 0
        loss_best_at_mark = loss_best.clone()
        halved_at_mark = torch.zeros(n, dtype=torch.bool, device=x.device)

        for k in range(self.steps):
            s = step.view(-1, *([1] * (x.dim() - 1)))
            z = project(x_cur + s * grad.sign())
            a = 1.0 if k == 0 else self.momentum
            x_next = project(x_cur + a * (z - x_cur) + (1 - a) * (x_cur - x_prev))
            x_prev, x_cur = x_cur, x_next
            loss, grad = self._loss_and_grad(loss_fn, x_cur, index)
            increases += (loss > loss_prev).float()
            loss_prev = loss
            better = loss > loss_best
            x_best[better], loss_best[better], grad_best[better] = x_cur[better], loss[better], grad[better]
            if k + 1 in marks:
                height = k + 1 - last_mark
                too_few_increases = increases < self.rho * height
                stalled = ~halved_at_mark & (loss_best <= loss_best_at_mark)
                halve = too_few_increases | stalled
                step[halve] /= 2
                x_cur[halve], grad[halve], x_prev[halve] = x_best[halve], grad_best[halve], x_best[halve]
                loss_prev[halve] = loss_best[halve]
                halved_at_mark, loss_best_at_mark = halve, loss_best.clone()
                increases.zero_()
                last_mark = k + 1
        return project(x_best), loss_best
