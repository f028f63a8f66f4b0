"""VP-SDE / DDPM schedule math as small pure functions (no model, no loop).

Conventions used across the package:

* Discrete steps: ``N = 1000`` betas linear from ``beta_min / N = 1e-4`` to ``beta_max / N = 0.02``.
  ``x_k`` is the state after ``k`` forward steps (``x_0`` is the image); step ``k -> k + 1`` uses
  ``betas[k]``, so ``x_k = sqrt(abar_k) x_0 + sqrt(1 - abar_k) eps`` with ``abar_k = prod_{j<k} (1 - betas[j])``
  (``discrete_alpha_bars()[k]``, with ``abar_0 = 1``).
* Continuous time: ``x_k`` sits at ``t = k / N``; the VP-SDE with ``beta(t) = beta_min + t (beta_max - beta_min)``
  has ``abar(t) = exp(-0.5 (beta_max - beta_min) t^2 - beta_min t)``; |abar(k/N) - abar_k| < 1e-3 for all k
  (relative < 0.2 % for t <= 0.3, up to 7 % near t = 1 where abar ~ 4e-5).
* Images live in [-1, 1]; per-image quantities (``t``, ``k``) are tensors of shape (B,) broadcast over (C, H, W).
"""

from __future__ import annotations

from functools import lru_cache

import torch

BETA_MIN = 0.1
BETA_MAX = 20.0
NUM_STEPS = 1000


def _bc(v: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """Per-image scalar(s) -> tensor broadcastable against ``x`` (B, ...), in x's dtype and device."""
    v = torch.as_tensor(v, dtype=torch.float64)
    v = v.reshape(-1, *([1] * (x.dim() - 1))) if v.dim() else v
    return v.to(device=x.device, dtype=x.dtype)


def beta(t: torch.Tensor | float, beta_min: float = BETA_MIN, beta_max: float = BETA_MAX) -> torch.Tensor:
    """Continuous noise rate beta(t), float64."""
    t = torch.as_tensor(t, dtype=torch.float64)
    return beta_min + t * (beta_max - beta_min)


def alpha_bar(t: torch.Tensor | float, beta_min: float = BETA_MIN, beta_max: float = BETA_MAX) -> torch.Tensor:
    """Signal fraction abar(t) = exp(-int_0^t beta) of the VP-SDE marginal, float64."""
    t = torch.as_tensor(t, dtype=torch.float64)
    return torch.exp(-0.5 * (beta_max - beta_min) * t**2 - beta_min * t)


@lru_cache(maxsize=8)
def discrete_betas(n: int = NUM_STEPS, beta_min: float = BETA_MIN, beta_max: float = BETA_MAX) -> torch.Tensor:
    """The DDPM linear schedule (n,), float64: betas[k] drives step k -> k + 1."""
    return torch.linspace(beta_min / n, beta_max / n, n, dtype=torch.float64)


@lru_cache(maxsize=8)
def discrete_alphas_cumprod(
    n: int = NUM_STEPS, beta_min: float = BETA_MIN, beta_max: float = BETA_MAX
) -> torch.Tensor:
    """DDPM's ``alphas_cumprod`` (n,): entry k is abar of x_{k+1} (guided-diffusion's indexing)."""
    return torch.cumprod(1.0 - discrete_betas(n, beta_min, beta_max), 0)


@lru_cache(maxsize=8)
def discrete_alpha_bars(n: int = NUM_STEPS, beta_min: float = BETA_MIN, beta_max: float = BETA_MAX) -> torch.Tensor:
    """abar_k indexed by the number of steps taken, k = 0..n (n + 1,), abar_0 = 1."""
    one = torch.ones(1, dtype=torch.float64)
    return torch.cat([one, discrete_alphas_cumprod(n, beta_min, beta_max)])


def forward_step(x: torch.Tensor, beta_k: torch.Tensor | float, noise: torch.Tensor) -> torch.Tensor:
    """One DDPM forward step x_{k+1} = sqrt(1 - beta_k) x_k + sqrt(beta_k) z."""
    b = _bc(beta_k, x)
    return torch.sqrt(1 - b) * x + torch.sqrt(b) * noise


def forward_move(x: torch.Tensor, k: int, s: int, noise: torch.Tensor, n: int = NUM_STEPS) -> torch.Tensor:
    """``s`` DDPM forward steps from x_k in one draw: the exact kernel q(x_{k+s} | x_k).

    For s = 1 this is ``forward_step`` with ``betas[k]``; for s > 1 the composed Gaussian kernel
    (mean sqrt(abar_{k+s} / abar_k) x_k, variance 1 - abar_{k+s} / abar_k), so the marginal is unchanged.
    """
    if not 0 <= k < k + s <= n:
        raise ValueError(f"forward_move needs 0 <= k < k + s <= {n}, got k={k}, s={s}")
    ab = discrete_alpha_bars(n)
    ratio = float(ab[k + s] / ab[k])
    return ratio**0.5 * x + (1.0 - ratio) ** 0.5 * noise


def marginal_sample(x0: torch.Tensor, abar: torch.Tensor | float, noise: torch.Tensor) -> torch.Tensor:
    """Closed-form x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps (abar per image or scalar)."""
    a = _bc(abar, x0)
    return torch.sqrt(a) * x0 + torch.sqrt(1 - a) * noise


def score_from_eps(eps: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """Score of the VP-SDE marginal from the noise prediction: -eps / sqrt(1 - abar(t))."""
    return -eps / torch.sqrt(1 - _bc(alpha_bar(t), eps))


def reverse_sde_step(
    x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor | float, dt: torch.Tensor | float, noise: torch.Tensor
) -> torch.Tensor:
    """One Euler-Maruyama step of the reverse VP-SDE from time t to t - dt.

    Forward SDE dx = -1/2 beta x dt + sqrt(beta) dw; reverse-time drift f - g^2 score, so going back by dt:
    x <- x + (1/2 beta x + beta score) dt + sqrt(beta dt) z.
    """
    b = _bc(beta(t), x)
    h = _bc(dt, x)
    score = score_from_eps(eps, t)
    return x + (0.5 * b * x + b * score) * h + torch.sqrt(b * h) * noise


def ddpm_step(
    x: torch.Tensor, eps: torch.Tensor, k: torch.Tensor | int, noise: torch.Tensor, n: int = NUM_STEPS
) -> torch.Tensor:
    """Ancestral step x_k -> x_{k-1} (k >= 1) with the posterior variance (no noise at k = 1)."""
    k = torch.as_tensor(k, dtype=torch.long)
    ab = discrete_alpha_bars(n)
    b_k = discrete_betas(n)[k - 1]
    a_k, a_prev = ab[k], ab[k - 1]
    mean = (x - _bc(b_k / torch.sqrt(1 - a_k), x) * eps) / _bc(torch.sqrt(1 - b_k), x)
    var = b_k * (1 - a_prev) / (1 - a_k)
    return mean + _bc(torch.sqrt(var), x) * noise


def ddim_step(
    x: torch.Tensor,
    eps: torch.Tensor,
    t: torch.Tensor | float,
    t_next: torch.Tensor | float,
    noise: torch.Tensor | None = None,
    eta: float = 0.0,
) -> torch.Tensor:
    """DDIM step from t to t_next < t on the continuous abar (eta = 0: deterministic)."""
    a, a_next = alpha_bar(t), alpha_bar(t_next)
    x0 = (x - _bc(torch.sqrt(1 - a), x) * eps) / _bc(torch.sqrt(a), x)
    sigma = eta * torch.sqrt((1 - a_next) / (1 - a) * (1 - a / a_next))
    out = _bc(torch.sqrt(a_next), x) * x0 + _bc(torch.sqrt((1 - a_next - sigma**2).clamp_min(0)), x) * eps
    if eta > 0:
        if noise is None:
            raise ValueError("ddim_step with eta > 0 needs noise")
        out = out + _bc(sigma, x) * noise
    return out
