"""VP-SDE / DDPM schedule math (diffcap/schedule.py) against closed forms and Monte Carlo."""

from __future__ import annotations

import math

import pytest
import torch

from diffcap import schedule


def gaussian_eps(x: torch.Tensor, t: torch.Tensor | float, m: float, s: float) -> torch.Tensor:
    """Exact noise prediction for data ~ N(m, s^2) per pixel: x_t ~ N(sqrt(a) m, a s^2 + 1 - a)."""
    a = schedule._bc(schedule.alpha_bar(t), x)
    return torch.sqrt(1 - a) * (x - torch.sqrt(a) * m) / (a * s**2 + 1 - a)


def test_endpoints():
    assert float(schedule.beta(0.0)) == pytest.approx(0.1, abs=1e-12)
    assert float(schedule.beta(1.0)) == pytest.approx(20.0, abs=1e-12)
    assert float(schedule.alpha_bar(0.0)) == 1.0
    assert float(schedule.alpha_bar(1.0)) == pytest.approx(math.exp(-10.05), rel=1e-12)
    b = schedule.discrete_betas()
    assert b.shape == (1000,)
    assert float(b[0]) == pytest.approx(1e-4, abs=1e-15)
    assert float(b[-1]) == pytest.approx(0.02, abs=1e-15)
    assert float(schedule.discrete_alpha_bars()[0]) == 1.0


def test_alphas_cumprod_is_the_product_of_one_minus_beta():
    betas = schedule.discrete_betas().tolist()
    prod, expected = 1.0, []
    for b in betas:
        prod *= 1.0 - b
        expected.append(prod)
    torch.testing.assert_close(schedule.discrete_alphas_cumprod(), torch.tensor(expected, dtype=torch.float64),
                               rtol=1e-12, atol=0)
    torch.testing.assert_close(schedule.discrete_alpha_bars()[1:], schedule.discrete_alphas_cumprod())


@pytest.mark.parametrize("t", [0.001, 0.05, 0.15, 0.3, 0.5, 1.0])
def test_continuous_abar_matches_discrete(t):
    """abar(k/N) vs prod_{j<k}(1-beta_j): absolute error < 1e-3 everywhere, relative < 0.2 % up to t = 0.3."""
    k = round(t * 1000)
    cont, disc = float(schedule.alpha_bar(t)), float(schedule.discrete_alpha_bars()[k])
    assert abs(cont - disc) < 1e-3
    if t <= 0.3:
        assert abs(cont - disc) / disc < 2e-3


def test_cumulative_forward_steps_match_closed_form_marginal():
    """150 single steps x_{k+1} = sqrt(1-b_k) x_k + sqrt(b_k) z have mean sqrt(abar) x0, variance 1 - abar."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.tensor([-0.8, 0.0, 0.5, 1.0]).view(4, 1).expand(4, 20000).contiguous()
    x = x0.clone()
    betas = schedule.discrete_betas()
    for k in range(150):
        x = schedule.forward_step(x, betas[k], torch.randn(x.shape, generator=g))
    abar = float(schedule.discrete_alpha_bars()[150])
    torch.testing.assert_close(x.mean(1), math.sqrt(abar) * x0[:, 0], atol=0.015, rtol=0)
    torch.testing.assert_close(x.var(1), torch.full((4,), 1 - abar), atol=0, rtol=0.04)
    # the same marginal in 15 coarse moves of 10 DDPM steps each, and the closed form
    y = x0.clone()
    for m in range(15):
        y = schedule.forward_move(y, 10 * m, 10, torch.randn(y.shape, generator=g))
    z = schedule.marginal_sample(x0, abar, torch.randn(x0.shape, generator=g))
    for s in (y, z):
        torch.testing.assert_close(s.mean(1), x.mean(1), atol=0.03, rtol=0)
        torch.testing.assert_close(s.var(1), x.var(1), atol=0, rtol=0.06)


def test_forward_move_of_one_step_is_forward_step():
    x, z = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(schedule.forward_move(x, 37, 1, z), schedule.forward_step(x, schedule.discrete_betas()[37], z))
    with pytest.raises(ValueError):
        schedule.forward_move(x, 999, 2, z)


def test_score_from_eps_is_the_gaussian_score():
    x, t, m, s = torch.randn(3, 5), torch.tensor([0.1, 0.3, 0.7]), 0.2, 0.4
    a = schedule.alpha_bar(t).float().view(-1, 1)
    exact = -(x - a.sqrt() * m) / (a * s**2 + 1 - a)
    torch.testing.assert_close(schedule.score_from_eps(gaussian_eps(x, t, m, s), t), exact)


def test_reverse_sde_with_exact_score_recovers_gaussian_data():
    """Euler-Maruyama dt = 1e-3 from the t = 0.5 marginal of N(m, s^2) lands back on N(m, s^2)."""
    m, s, t0, dt = 0.3, 0.5, 0.5, 1e-3
    g = torch.Generator().manual_seed(1)
    a = float(schedule.alpha_bar(t0))
    x = math.sqrt(a) * m + math.sqrt(a * s**2 + 1 - a) * torch.randn(4, 50000, generator=g)
    for j in range(round(t0 / dt), 0, -1):
        t = j * dt
        x = schedule.reverse_sde_step(x, gaussian_eps(x, t, m, s), t, dt, torch.randn(x.shape, generator=g))
    assert abs(float(x.mean()) - m) < 0.01
    assert float(x.var()) == pytest.approx(s**2, rel=0.03)
    # the noised start was far from the data distribution, so this is a real test
    assert abs(a * s**2 + 1 - a - s**2) > 0.3


def test_ddpm_and_ddim_steps_with_exact_eps_recover_gaussian_data():
    m, s = -0.2, 0.6
    g = torch.Generator().manual_seed(2)
    a = float(schedule.alpha_bar(0.3))
    start = math.sqrt(a) * m + math.sqrt(a * s**2 + 1 - a) * torch.randn(4, 50000, generator=g)
    x = start.clone()
    for k in range(300, 0, -1):
        x = schedule.ddpm_step(x, gaussian_eps(x, k / 1000, m, s), k, torch.randn(x.shape, generator=g))
    assert abs(float(x.mean()) - m) < 0.01 and float(x.var()) == pytest.approx(s**2, rel=0.05)
    x, ts = start.clone(), torch.linspace(0.3, 0.0, 51, dtype=torch.float64)
    for t, tn in zip(ts[:-1], ts[1:], strict=True):
        x = schedule.ddim_step(x, gaussian_eps(x, t, m, s), t, tn)
    assert abs(float(x.mean()) - m) < 0.01 and float(x.var()) == pytest.approx(s**2, rel=0.05)
