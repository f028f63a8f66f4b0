"""The noise schedule (diffcap/schedule.py) against closed forms, Monte Carlo and guided-diffusion's formulas.

The references here are written independently of the module (numpy, float64, from the published
definitions), so a wrong index, sign or square root in the module fails them.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffcap.schedule import LINEAR, Schedule, schedule_of

# guided-diffusion's linear schedule, written out independently
BETAS = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
AC = np.cumprod(1.0 - BETAS)
AC_PREV = np.append(1.0, AC[:-1])
POST_VAR = BETAS * (1 - AC_PREV) / (1 - AC)
POST_LOG = np.log(np.append(POST_VAR[1], POST_VAR[1:]))


def gaussian_eps(x: torch.Tensor, abar: torch.Tensor | float, m: float, s: float) -> torch.Tensor:
    """Exact noise prediction for data ~ N(m, s^2) per pixel: x_t ~ N(sqrt(a) m, a s^2 + 1 - a)."""
    a = torch.as_tensor(abar, dtype=torch.float64).to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
    return torch.sqrt(1 - a) * (x - torch.sqrt(a) * m) / (a * s**2 + 1 - a)


def test_tables_match_guided_diffusion():
    assert Schedule.from_betas(1e-4, 0.02, 1000) == LINEAR
    np.testing.assert_allclose(LINEAR.betas.numpy(), BETAS, rtol=1e-15, atol=0)
    np.testing.assert_allclose(LINEAR.alphas_cumprod.numpy(), AC, rtol=1e-13, atol=0)
    np.testing.assert_allclose(LINEAR.alpha_bars.numpy(), np.append(1.0, AC), rtol=1e-13, atol=0)
    np.testing.assert_allclose(LINEAR.posterior_variance.numpy(), POST_VAR, rtol=1e-12, atol=0)
    assert float(LINEAR.beta(0.0)) == pytest.approx(0.1, abs=1e-12)
    assert float(LINEAR.beta(1.0)) == pytest.approx(20.0, abs=1e-12)
    assert float(LINEAR.alpha_bar(1.0)) == pytest.approx(math.exp(-10.05), rel=1e-12)
    assert LINEAR.steps(torch.tensor([0.0, 0.15, 0.2996, 1.0])).tolist() == [0, 150, 300, 1000]
    # guided-diffusion rescales the linear schedule for other step counts
    np.testing.assert_allclose(Schedule.from_betas(1e-4 * 4, 0.02 * 4, 250).betas.numpy(),
                               np.linspace(4e-4, 0.08, 250), rtol=1e-14)


@pytest.mark.parametrize("t", [0.001, 0.05, 0.15, 0.3, 0.5, 1.0])
def test_continuous_abar_close_to_discrete(t):
    """abar(k/N) vs prod_{j<k}(1-beta_j): absolute error < 1e-3 everywhere, relative 0.1 % at t* = 0.15."""
    k = round(t * 1000)
    cont, disc = float(LINEAR.alpha_bar(t)), float(AC[k - 1])
    assert abs(cont - disc) < 1e-3
    if t <= 0.3:
        assert abs(cont - disc) / disc < 2e-3
    if t == 0.15:  # the two really differ: the discrete value is what DiffPure noises with
        assert abs(cont - disc) / disc > 5e-4


def test_forward_move_is_the_ddpm_step_with_this_steps_beta():
    g = torch.Generator().manual_seed(0)
    x, z = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64), torch.randn(2, 3, 4, 4, generator=g,
                                                                                   dtype=torch.float64)
    for k in (0, 37, 998):
        want = math.sqrt(1 - BETAS[k]) * x + math.sqrt(BETAS[k]) * z
        torch.testing.assert_close(LINEAR.forward_move(x, k, 1, z), want, rtol=1e-12, atol=1e-12)
    # s steps at once: mean sqrt(abar_{k+s} / abar_k), variance 1 - that ratio
    r = AC[36 + 10] / AC[36]
    torch.testing.assert_close(LINEAR.forward_move(x, 37, 10, z), math.sqrt(r) * x + math.sqrt(1 - r) * z,
                               rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError):
        LINEAR.forward_move(x, 999, 2, z)


def test_cumulative_forward_steps_match_closed_form_marginal():
    """150 single steps have mean sqrt(abar_150) x0 and variance 1 - abar_150, as coarse moves and q_sample."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.tensor([-0.8, 0.0, 0.5, 1.0]).view(4, 1).expand(4, 20000).contiguous()
    x = x0.clone()
    for k in range(150):
        x = LINEAR.forward_move(x, k, 1, torch.randn(x.shape, generator=g))
    abar = float(AC[149])
    torch.testing.assert_close(x.mean(1), math.sqrt(abar) * x0[:, 0], atol=0.015, rtol=0)
    torch.testing.assert_close(x.var(1), torch.full((4,), 1 - abar), atol=0, rtol=0.04)
    y = x0.clone()
    for m in range(15):
        y = LINEAR.forward_move(y, 10 * m, 10, torch.randn(y.shape, generator=g))
    z = LINEAR.q_sample(x0, abar, torch.randn(x0.shape, generator=g))
    for s in (y, z):
        torch.testing.assert_close(s.mean(1), x.mean(1), atol=0.03, rtol=0)
        torch.testing.assert_close(s.var(1), x.var(1), atol=0, rtol=0.06)


def test_q_sample_formula():
    x0, e = torch.tensor([[0.5, -1.0]]), torch.tensor([[1.0, 2.0]])
    torch.testing.assert_close(LINEAR.q_sample(x0, 0.64, e), torch.tensor([[0.4 + 0.6, -0.8 + 1.2]]))


def test_score_from_eps_is_the_gaussian_score():
    x, t, m, s = torch.randn(3, 5), torch.tensor([0.1, 0.3, 0.7]), 0.2, 0.4
    a = LINEAR.alpha_bar(t).float().view(-1, 1)
    exact = -(x - a.sqrt() * m) / (a * s**2 + 1 - a)
    torch.testing.assert_close(LINEAR.score_from_eps(gaussian_eps(x, a.view(-1), m, s), t), exact)


def test_reverse_sde_step_formula():
    """x + (beta/2 x + beta score) dt + sqrt(beta dt) z, with beta(t) and score -eps / sqrt(1 - abar(t))."""
    x, eps, z = torch.tensor([0.3, -0.4], dtype=torch.float64), torch.tensor([0.5, 1.0], dtype=torch.float64), \
        torch.tensor([-1.0, 0.25], dtype=torch.float64)
    t, dt = 0.2, 1e-3
    b = 0.1 + t * 19.9
    ab = math.exp(-0.5 * 19.9 * t**2 - 0.1 * t)
    want = x + (0.5 * b * x - b * eps / math.sqrt(1 - ab)) * dt + math.sqrt(b * dt) * z
    torch.testing.assert_close(LINEAR.reverse_sde_step(x, eps, t, dt, z), want, rtol=1e-13, atol=0)


def test_reverse_sde_with_exact_score_recovers_gaussian_data():
    """Euler-Maruyama dt = 1e-3 from the t = 0.5 marginal of N(m, s^2) lands back on N(m, s^2)."""
    m, s, t0, dt = 0.3, 0.5, 0.5, 1e-3
    g = torch.Generator().manual_seed(1)
    a = float(LINEAR.alpha_bar(t0))
    x = math.sqrt(a) * m + math.sqrt(a * s**2 + 1 - a) * torch.randn(4, 50000, generator=g)
    for j in range(round(t0 / dt), 0, -1):
        t = j * dt
        eps = gaussian_eps(x, LINEAR.alpha_bar(t), m, s)
        x = LINEAR.reverse_sde_step(x, eps, t, dt, torch.randn(x.shape, generator=g))
    assert abs(float(x.mean()) - m) < 0.01
    assert float(x.var()) == pytest.approx(s**2, rel=0.03)
    assert abs(a * s**2 + 1 - a - s**2) > 0.3  # the start was far from the data: a real test


def ref_p_sample(x, eps, i, noise, v=None, clip=True):
    """guided-diffusion's p_sample (epsilon model, learned range or fixed small), numpy float64."""
    x0 = np.sqrt(1 / AC[i]) * x - np.sqrt(1 / AC[i] - 1) * eps
    if clip:
        x0 = np.clip(x0, -1, 1)
    mean = BETAS[i] * np.sqrt(AC_PREV[i]) / (1 - AC[i]) * x0 + (1 - AC_PREV[i]) * np.sqrt(1 - BETAS[i]) / (1 - AC[i]) * x
    if v is None:
        log_var = POST_LOG[i]
    else:
        frac = (v + 1) / 2
        log_var = frac * np.log(BETAS[i]) + (1 - frac) * POST_LOG[i]
    return mean + (i != 0) * np.exp(0.5 * log_var) * noise


@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("learned", [True, False])
@pytest.mark.parametrize("i", [0, 1, 149, 700])
def test_ddpm_step_is_guided_diffusions_p_sample(i, learned, clip):
    g = torch.Generator().manual_seed(i)
    x = 2.5 * torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)  # large: clipping x0 matters
    eps = 0.3 * torch.randn(x.shape, generator=g, dtype=torch.float64)
    z = torch.randn(x.shape, generator=g, dtype=torch.float64)
    v = torch.rand(x.shape, generator=g, dtype=torch.float64) * 2 - 1 if learned else None
    got = LINEAR.ddpm_step(x, eps, torch.tensor([i, i]), z, v, clip)
    want = ref_p_sample(x.numpy(), eps.numpy(), i, z.numpy(), None if v is None else v.numpy(), clip)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-12)
    assert not np.allclose(ref_p_sample(x.numpy(), eps.numpy(), i, z.numpy(), None, not clip), want)


def test_ddpm_step_per_image_indices():
    x, eps, z = torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    both = LINEAR.ddpm_step(x, eps, torch.tensor([5, 300]), z)
    torch.testing.assert_close(both[0], LINEAR.ddpm_step(x[:1], eps[:1], torch.tensor([5]), z[:1])[0])
    torch.testing.assert_close(both[1], LINEAR.ddpm_step(x[1:], eps[1:], torch.tensor([300]), z[1:])[0])


def test_ddpm_and_ddim_steps_with_exact_eps_recover_gaussian_data():
    m, s = -0.2, 0.6
    g = torch.Generator().manual_seed(2)
    a = float(AC[299])
    start = math.sqrt(a) * m + math.sqrt(a * s**2 + 1 - a) * torch.randn(4, 50000, generator=g)
    x = start.clone()
    for i in range(299, -1, -1):
        x = LINEAR.ddpm_step(x, gaussian_eps(x, AC[i], m, s), i, torch.randn(x.shape, generator=g), clip=False)
    assert abs(float(x.mean()) - m) < 0.01 and float(x.var()) == pytest.approx(s**2, rel=0.05)
    x, ts = start.clone(), torch.linspace(0.3, 0.0, 51, dtype=torch.float64)
    for t, tn in zip(ts[:-1], ts[1:], strict=True):
        x = LINEAR.ddim_step(x, gaussian_eps(x, LINEAR.alpha_bar(t), m, s), t, tn)
    assert abs(float(x.mean()) - m) < 0.01 and float(x.var()) == pytest.approx(s**2, rel=0.05)


def test_schedule_of_reads_the_denoisers_schedule():
    class WithSchedule:
        schedule = Schedule(500, 0.1, 20.0)

    assert schedule_of(WithSchedule()) == Schedule(500, 0.1, 20.0)
    assert schedule_of(object()) is LINEAR
