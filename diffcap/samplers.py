"""Reverse-diffusion samplers, built from configs (``_target_: diffcap.samplers.ReverseSDE``).

Each sampler integrates every image from its own start time ``t_start[i]`` down to 0. All images walk a
common time grid: at every grid step the denoiser runs once, on exactly the images whose trajectory is
active at that time, so images that share a start time are always denoised together and no evaluation is
wasted. Noise for image i comes only from ``generators[i]``, drawn in a fixed order, so an image's result
does not depend on the rest of its batch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from diffcap.schedule import LINEAR, Schedule, schedule_of

DenoiserFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | nn.Module


def per_image_noise(shape: Sequence[int], generators: Sequence[torch.Generator], like: torch.Tensor) -> torch.Tensor:
    """One standard normal draw of ``shape`` per generator, stacked, on ``like``'s device and dtype (drawn in
    place into one buffer where the generators share a device: the same numbers without a stacking copy)."""
    devices = {g.device for g in generators}
    if len(devices) != 1:
        draws = [torch.randn(tuple(shape), generator=g, device=g.device, dtype=torch.float32) for g in generators]
        return torch.stack(draws).to(device=like.device, dtype=like.dtype)
    out = torch.empty((len(generators), *shape), device=devices.pop(), dtype=torch.float32)
    for row, g in zip(out, generators, strict=True):
        torch.randn(tuple(shape), generator=g, out=row)
    return out.to(device=like.device, dtype=like.dtype)


def _eps(denoiser: DenoiserFn, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return denoiser(x, t.to(device=x.device, dtype=torch.float32)).to(x.dtype)


def _predict(denoiser: DenoiserFn, x: torch.Tensor, i: torch.Tensor,
             sched: Schedule) -> tuple[torch.Tensor, torch.Tensor | None]:
    """eps (and the learned-variance channels, if any) at guided-diffusion index ``i`` (B,) long.

    Denoisers with ``predict(x, i)`` (``diffcap.denoisers.Denoiser``) get the index itself; any other callable
    is a fixed-variance eps model called at the continuous time ``i / N``.
    """
    if hasattr(denoiser, "predict"):
        eps, var = denoiser.predict(x, i.to(x.device))
        return eps.to(x.dtype), None if var is None else var.to(x.dtype)
    return _eps(denoiser, x, i.double() / sched.num_steps), None


class Sampler(ABC):
    """Integrates images from per-image start times back to t = 0."""

    @abstractmethod
    def num_evals(self, t_start: torch.Tensor, sched: Schedule = LINEAR) -> torch.Tensor:
        """Denoiser evaluations (B,) long that images started at ``t_start`` (B,) cost."""

    @abstractmethod
    def sample(
        self,
        denoiser: DenoiserFn,
        x_t: torch.Tensor,
        t_start: torch.Tensor,
        generators: Sequence[torch.Generator],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return x_0 (same shape as x_t) and the number of denoiser evaluations per image (B,) long.

        The schedule is the denoiser's own (``schedule_of(denoiser)``).
        """


def _check(x_t: torch.Tensor, t_start: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    t_start = torch.as_tensor(t_start, dtype=torch.float64).detach().cpu().reshape(-1)
    if t_start.numel() != x_t.shape[0] or len(generators) != x_t.shape[0]:
        raise ValueError(
            f"need one start time and one generator per image: {x_t.shape[0]} images, "
            f"{t_start.numel()} times, {len(generators)} generators"
        )
    if (t_start < 0).any() or (t_start > 1).any():
        raise ValueError(f"start times must lie in [0, 1], got {t_start.tolist()}")
    return t_start


def _walk(
    x: torch.Tensor,
    n_steps: torch.Tensor,
    step: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor],
    countdown: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``step(x_active, idx, j)`` over rounds; image i takes part in ``n_steps[i]`` of them.

    countdown=True: rounds j = max..1 and image i is active while j <= n_steps[i] (late starters join as
    the time passes their start). countdown=False: rounds j = 0..max-1, image i active while j < n_steps[i].
    """
    out = x.clone()
    n_max = int(n_steps.max()) if n_steps.numel() else 0
    rounds = range(n_max, 0, -1) if countdown else range(n_max)
    for j in rounds:
        active = (n_steps >= j) if countdown else (n_steps > j)
        idx = active.nonzero().squeeze(1)
        dev_idx = idx.to(x.device)
        out[dev_idx] = step(out[dev_idx], idx, j)
    return out, n_steps.clone()


@dataclass(frozen=True)
class ReverseSDE(Sampler):
    """Euler-Maruyama on the reverse VP-SDE with step ``dt`` (DiffPure's default, dt = 1e-3).

    Image i takes ceil(t_start[i] / dt) steps on the grid j * dt; a start time off the grid gives that
    image one shorter first step. The denoiser is evaluated at the start of each step (never at t = 0),
    and noise is added at every step, the last included, as torchsde's Euler scheme does.

    Departure from DiffPure: DiffPure integrates to t = 1e-5 (so its last step is 1e-5 shorter); this sampler
    integrates to t = 0.
    """

    dt: float = 1e-3

    def __post_init__(self) -> None:
        if not 0 < self.dt <= 1:
            raise ValueError(f"sampler.dt must be in (0, 1], got {self.dt}")

    def num_evals(self, t_start, sched=LINEAR):
        t_start = torch.as_tensor(t_start, dtype=torch.float64)
        return torch.ceil(t_start / self.dt - 1e-6).clamp_min(0).long()

    def sample(self, denoiser, x_t, t_start, generators):
        t_start = _check(x_t, t_start, generators)
        sched = schedule_of(denoiser)
        n_steps = self.num_evals(t_start, sched)

        def step(x: torch.Tensor, idx: torch.Tensor, j: int) -> torch.Tensor:
            t = torch.minimum(t_start[idx], torch.full_like(t_start[idx], j * self.dt))
            h = t - (j - 1) * self.dt
            eps = _eps(denoiser, x, t)
            z = per_image_noise(x.shape[1:], [generators[i] for i in idx.tolist()], x)
            return sched.reverse_sde_step(x, eps, t, h, z)

        return _walk(x_t, n_steps, step)


@dataclass(frozen=True)
class DDPMAncestral(Sampler):
    """Ancestral DDPM sampling on the discrete steps, as DiffPure's DDPM runner (guided-diffusion ``p_sample``).

    Image i starts at x_k with k = round(t_start[i] * N) and takes k steps. The step from x_j to x_{j-1} hands
    the network guided-diffusion's index j - 1 (the index x_j was trained at), predicts the clean image from
    eps and clips it to [-1, 1] (``clip_denoised``, DiffPure: true), takes the posterior mean, and samples with
    the learned variance when the denoiser has ``learn_sigma`` (guided-diffusion's learned range), else with the
    posterior variance. Departure: guided-diffusion would use beta ("fixed large") for a model without learned
    variance and default flags; the posterior variance ("fixed small") is used here. Noise is drawn at every
    step (the last step adds none), so every image consumes its generator in the same order.
    """

    clip_denoised: bool = True

    def num_evals(self, t_start, sched=LINEAR):
        return sched.steps(t_start)

    def sample(self, denoiser, x_t, t_start, generators):
        t_start = _check(x_t, t_start, generators)
        sched = schedule_of(denoiser)
        n_steps = self.num_evals(t_start, sched)

        def step(x: torch.Tensor, idx: torch.Tensor, j: int) -> torch.Tensor:
            i = torch.full((len(idx),), j - 1, dtype=torch.long)
            eps, var = _predict(denoiser, x, i, sched)
            z = per_image_noise(x.shape[1:], [generators[k] for k in idx.tolist()], x)
            return sched.ddpm_step(x, eps, i, z, var, self.clip_denoised)

        return _walk(x_t, n_steps, step)


@dataclass(frozen=True)
class DDIM(Sampler):
    """DDIM with ``steps`` uniform steps from each image's own t_start to 0 (continuous abar).

    An image with t_start < steps / N takes ceil(t_start * N) steps instead (no finer than one DDPM step).
    All images step in the same rounds with their own times, so a batch costs max_i(steps_i) calls.
    DiffPure has no DDIM reverse pass; this one is the project's (no clipping of the predicted clean image).
    """

    steps: int = 10
    eta: float = 0.0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"sampler.steps must be >= 1, got {self.steps}")
        if self.eta < 0:
            raise ValueError(f"sampler.eta must be >= 0, got {self.eta}")

    def num_evals(self, t_start, sched=LINEAR):
        t_start = torch.as_tensor(t_start, dtype=torch.float64)
        fine = torch.ceil(t_start * sched.num_steps - 1e-6).clamp_min(0).long()
        return torch.clamp(fine, max=self.steps)

    def sample(self, denoiser, x_t, t_start, generators):
        t_start = _check(x_t, t_start, generators)
        sched = schedule_of(denoiser)
        n_steps = self.num_evals(t_start, sched)

        def step(x: torch.Tensor, idx: torch.Tensor, j: int) -> torch.Tensor:
            t0, n = t_start[idx], n_steps[idx].double()
            t, t_next = t0 * (1 - j / n), t0 * (1 - (j + 1) / n)
            eps = _eps(denoiser, x, t)
            z = None
            if self.eta > 0:
                z = per_image_noise(x.shape[1:], [generators[i] for i in idx.tolist()], x)
            return sched.ddim_step(x, eps, t, t_next.clamp_min(0), z, self.eta)

        return _walk(x_t, n_steps, step, countdown=False)
