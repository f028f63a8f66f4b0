"""The noise schedule: one object (``Schedule``) that owns every piece of VP-SDE / DDPM arithmetic.

Why one object: the purifiers, the samplers, the denoiser wrapper, the training script and the tau
calibration all need abar, the forward kernel and the reverse steps; computing them in one place is what
keeps a fix in one of them from silently missing the others. ``LINEAR`` is the instance the project uses
(guided-diffusion's 1000-step linear schedule, betas 1e-4..0.02, i.e. the VP-SDE with beta_min 0.1 and
beta_max 20 that DiffPure integrates).

Index conventions (both appear, so every method says which one it takes):

* **steps taken** ``k = 0..N``: ``x_k`` is the state after ``k`` forward steps (``x_0`` the image); step
  ``k -> k + 1`` uses ``betas[k]``; ``alpha_bars[k] = prod_{j<k} (1 - betas[j])`` with ``alpha_bars[0] = 1``.
* **guided-diffusion index** ``i = 0..N-1``: the network's time input; index ``i`` denotes ``x_{i+1}``
  (``alphas_cumprod[i] = alpha_bars[i + 1]``). DiffPure's DDPM runner hands the network ``i`` while it
  turns ``x_{i+1}`` into ``x_i``.
* **continuous time** ``t in [0, 1]``: ``x_k`` sits at ``t = k / N``; ``abar(t) = exp(-0.5 (beta_max -
  beta_min) t^2 - beta_min t)`` differs from ``alpha_bars[k]`` by < 1e-3 absolute (0.1 % relative at
  t = 0.15, up to 7 % near t = 1 where abar ~ 4e-5).

Images live in [-1, 1]; per-image quantities (t, k, i) may be tensors of shape (B,) broadcast over (C, H, W).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch


def _bc(v: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """Per-image scalar(s) -> tensor broadcastable against ``x`` (B, ...), in x's dtype and device."""
    v = torch.as_tensor(v, dtype=torch.float64)
    v = v.reshape(-1, *([1] * (x.dim() - 1))) if v.dim() else v
    return v.to(device=x.device, dtype=x.dtype)


def _take(table: torch.Tensor, index: torch.Tensor | int) -> torch.Tensor:
    """``table[index]`` for an int or a (B,) tensor of indices on any device (the table lives on the CPU)."""
    return table[torch.as_tensor(index, dtype=torch.long).cpu()]


@dataclass(frozen=True)
class Schedule:
    """Linear VP / DDPM schedule with ``num_steps`` discrete steps; all tables are float64 on the CPU."""

    num_steps: int = 1000
    beta_min: float = 0.1
    beta_max: float = 20.0

    def __post_init__(self) -> None:
        if self.num_steps < 1 or not 0 < self.beta_min < self.beta_max:
            raise ValueError(f"bad schedule: num_steps={self.num_steps}, beta in [{self.beta_min}, {self.beta_max}]")

    @classmethod
    def from_betas(cls, beta_start: float, beta_end: float, num_steps: int) -> Schedule:
        """The schedule whose discrete betas run linearly from ``beta_start`` to ``beta_end``."""
        return cls(int(num_steps), beta_start * num_steps, beta_end * num_steps)

    # ------------------------------------------------------------------------------------------ tables

    @cached_property
    def betas(self) -> torch.Tensor:
        """(N,): ``betas[k]`` drives step k -> k + 1."""
        n = self.num_steps
        return torch.linspace(self.beta_min / n, self.beta_max / n, n, dtype=torch.float64)

    @cached_property
    def alphas_cumprod(self) -> torch.Tensor:
        """(N,): guided-diffusion's ``alphas_cumprod``; entry i is abar of x_{i+1}."""
        return torch.cumprod(1.0 - self.betas, 0)

    @cached_property
    def alpha_bars(self) -> torch.Tensor:
        """(N + 1,): abar indexed by steps taken, ``alpha_bars[0] = 1``."""
        return torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod])

    @cached_property
    def posterior_variance(self) -> torch.Tensor:
        """(N,): variance of q(x_i | x_{i+1}, x_0) by guided-diffusion index i (0 at i = 0)."""
        prev = self.alpha_bars[:-1]
        return self.betas * (1 - prev) / (1 - self.alphas_cumprod)

    def steps(self, t: torch.Tensor | float) -> torch.Tensor:
        """Continuous time -> the nearest number of discrete steps k = round(N t) (long)."""
        return torch.round(torch.as_tensor(t, dtype=torch.float64) * self.num_steps).long()

    # ------------------------------------------------------------------------------------ continuous time

    def beta(self, t: torch.Tensor | float) -> torch.Tensor:
        """Continuous noise rate beta(t), float64."""
        t = torch.as_tensor(t, dtype=torch.float64)
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def alpha_bar(self, t: torch.Tensor | float) -> torch.Tensor:
        """Signal fraction abar(t) = exp(-int_0^t beta) of the VP-SDE marginal, float64."""
        t = torch.as_tensor(t, dtype=torch.float64)
        return torch.exp(-0.5 * (self.beta_max - self.beta_min) * t**2 - self.beta_min * t)

    # ------------------------------------------------------------------------------------------ forward

    @staticmethod
    def q_sample(x0: torch.Tensor, abar: torch.Tensor | float, noise: torch.Tensor) -> torch.Tensor:
        """Closed-form x = sqrt(abar) x_0 + sqrt(1 - abar) eps (abar per image or scalar)."""
        a = _bc(abar, x0)
        return torch.sqrt(a) * x0 + torch.sqrt(1 - a) * noise

    def forward_move(self, x: torch.Tensor, k: int, s: int, noise: torch.Tensor) -> torch.Tensor:
        """``s`` forward steps from x_k in one draw: the exact kernel q(x_{k+s} | x_k).

        s = 1 is the DDPM step x_{k+1} = sqrt(1 - betas[k]) x_k + sqrt(betas[k]) z; s > 1 the composed Gaussian
        (mean sqrt(abar_{k+s} / abar_k) x_k, variance 1 - abar_{k+s} / abar_k), so the marginal is unchanged.
        """
        if not 0 <= k < k + s <= self.num_steps:
            raise ValueError(f"forward_move needs 0 <= k < k + s <= {self.num_steps}, got k={k}, s={s}")
        ratio = float(self.alpha_bars[k + s] / self.alpha_bars[k])
        return ratio**0.5 * x + (1.0 - ratio) ** 0.5 * noise

    # ------------------------------------------------------------------------------------------ reverse

    def score_from_eps(self, eps: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """Score of the VP-SDE marginal from the noise prediction: -eps / sqrt(1 - abar(t))."""
        return -eps / torch.sqrt(1 - _bc(self.alpha_bar(t), eps))

    def reverse_sde_step(
        self, x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor | float, dt: torch.Tensor | float,
        noise: torch.Tensor,
    ) -> torch.Tensor:
        """One Euler-Maruyama step of the reverse VP-SDE from time t to t - dt.

        Forward SDE dx = -1/2 beta x dt + sqrt(beta) dw; reverse-time drift f - g^2 score, so going back by dt:
        x <- x + (1/2 beta x + beta score) dt + sqrt(beta dt) z.
        """
        b = _bc(self.beta(t), x)
        h = _bc(dt, x)
        return x + (0.5 * b * x + b * self.score_from_eps(eps, t)) * h + torch.sqrt(b * h) * noise

    def ddpm_step(
        self,
        x: torch.Tensor,
        eps: torch.Tensor,
        i: torch.Tensor | int,
        noise: torch.Tensor,
        var_values: torch.Tensor | None = None,
        clip: bool = True,
    ) -> torch.Tensor:
        """Ancestral step x_{i+1} -> x_i at guided-diffusion index i, as guided-diffusion's ``p_sample``.

        The clean image is predicted from eps (and clipped to [-1, 1] when ``clip``), the mean is the posterior
        mean q(x_i | x_{i+1}, x0_hat). Variance: with ``var_values`` (the second half of a ``learn_sigma``
        network's output, in [-1, 1]) the log variance is interpolated between the clipped posterior log
        variance (at -1) and log beta_i (at +1), guided-diffusion's "learned range"; without, the posterior
        variance ("fixed small"). No noise is added at i = 0.
        """
        i = torch.as_tensor(i, dtype=torch.long)
        ac, ac_prev = _take(self.alphas_cumprod, i), _take(self.alpha_bars, i)
        b = _take(self.betas, i)
        x0 = _bc(torch.rsqrt(ac), x) * x - _bc(torch.sqrt(1 / ac - 1), x) * eps
        if clip:
            x0 = x0.clamp(-1, 1)
        mean = _bc(b * torch.sqrt(ac_prev) / (1 - ac), x) * x0 + _bc((1 - ac_prev) * torch.sqrt(1 - b) / (1 - ac), x) * x
        # log of the posterior variance, its i = 0 entry (0) replaced by the i = 1 entry, as guided-diffusion does
        post = self.posterior_variance
        min_log = _bc(torch.log(_take(torch.cat([post[1:2], post[1:]]), i)), x)
        if var_values is None:
            log_var = min_log
        else:
            frac = (var_values.to(x.dtype) + 1) / 2
            log_var = frac * _bc(torch.log(b), x) + (1 - frac) * min_log
        nonzero = _bc((i > 0).double(), x)
        return mean + nonzero * torch.exp(0.5 * log_var) * noise

    def ddim_step(
        self,
        x: torch.Tensor,
        eps: torch.Tensor,
        t: torch.Tensor | float,
        t_next: torch.Tensor | float,
        noise: torch.Tensor | None = None,
        eta: float = 0.0,
    ) -> torch.Tensor:
        """DDIM step from t to t_next < t on the continuous abar (eta = 0: deterministic)."""
        a, a_next = self.alpha_bar(t), self.alpha_bar(t_next)
        x0 = (x - _bc(torch.sqrt(1 - a), x) * eps) / _bc(torch.sqrt(a), x)
        sigma = eta * torch.sqrt((1 - a_next) / (1 - a) * (1 - a / a_next))
        out = _bc(torch.sqrt(a_next), x) * x0 + _bc(torch.sqrt((1 - a_next - sigma**2).clamp_min(0)), x) * eps
        if eta > 0:
            if noise is None:
                raise ValueError("ddim_step with eta > 0 needs noise")
            out = out + _bc(sigma, x) * noise
        return out


#: guided-diffusion's 1000-step linear schedule (1e-4..0.02) = DiffPure's VP-SDE (beta_min 0.1, beta_max 20).
LINEAR = Schedule()


def schedule_of(denoiser: object) -> Schedule:
    """The schedule a denoiser was trained on (its ``schedule`` attribute); ``LINEAR`` when it names none."""
    s = getattr(denoiser, "schedule", None)
    return s if isinstance(s, Schedule) else LINEAR
