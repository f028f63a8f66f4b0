"""Samplers (diffcap/samplers.py) against step-by-step references written here, and against exact scores.

Each reference follows one image at a time through its own loop, with its own generator, so batching,
grouping by start time, the index handed to the network, the variance and the noise order are all checked.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from diffcap.samplers import DDIM, DDPMAncestral, ReverseSDE
from diffcap.schedule import LINEAR
from tests.standins import Counting, GaussianDenoiser, TinyDenoiser, gens
from tests.test_schedule import ref_p_sample

RES = 8


def abar(t: float) -> float:
    return math.exp(-0.5 * 19.9 * t**2 - 0.1 * t)


def draw(g: torch.Generator) -> torch.Tensor:
    return torch.randn((3, RES, RES), generator=g, dtype=torch.float32).double()


class IndexModel(nn.Module):
    """eps (and, with ``learned``, variance channels) as fixed smooth functions of x and the index."""

    def __init__(self, learned: bool):
        super().__init__()
        self.learned, self.resolution, self.seen = learned, RES, []

    @staticmethod
    def eps(x, i):
        return 0.4 * torch.tanh(x * (1 + i / 1000))

    @staticmethod
    def var(x, i):
        return torch.tanh(x + i / 300)

    def predict(self, x, i):
        self.seen.append(i.tolist())
        ii = i.double().view(-1, 1, 1, 1).to(x)
        return self.eps(x, ii), self.var(x, ii) if self.learned else None


def time_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return 0.5 * torch.tanh(x) * (1 + t.double().view(-1, 1, 1, 1)) + 0.1 * t.double().view(-1, 1, 1, 1)


def start(n: int, scale: float = 2.0) -> torch.Tensor:
    return scale * torch.randn(n, 3, RES, RES, generator=torch.Generator().manual_seed(5), dtype=torch.float64)


@pytest.mark.parametrize("learned", [True, False])
@pytest.mark.parametrize("clip", [True, False])
def test_ddpm_matches_guided_diffusion_p_sample_loop(learned, clip):
    """DiffPure's DDPM runner: from x_k, indices k-1..0, p_sample with clipped x0 and (learned) variance."""
    t_start = torch.tensor([0.005, 0.003, 0.0, 0.005], dtype=torch.float64)
    x_t, model = start(4), IndexModel(learned)
    out, n = DDPMAncestral(clip_denoised=clip).sample(model, x_t, t_start, gens(4))
    assert n.tolist() == [5, 3, 0, 5]
    assert model.seen == [[4, 4], [3, 3], [2, 2, 2], [1, 1, 1], [0, 0, 0]]
    for b, g in enumerate(gens(4)):
        x = x_t[b].numpy()
        for i in range(round(float(t_start[b]) * 1000) - 1, -1, -1):
            xt = torch.from_numpy(x)
            eps = IndexModel.eps(xt, i).numpy()
            v = IndexModel.var(xt, i).numpy() if learned else None
            x = ref_p_sample(x, eps, i, draw(g).numpy(), v, clip)
        np.testing.assert_allclose(out[b].numpy(), x, rtol=1e-6, atol=1e-6)


def test_ddpm_calls_a_plain_eps_model_at_the_index_time():
    """A denoiser without ``predict`` is called at t = i / N (the Denoiser maps that back to index i)."""
    seen = []

    def model(x, t):
        seen.append(t.tolist())
        return torch.zeros_like(x)

    DDPMAncestral().sample(model, start(1), torch.tensor([0.002]), gens(1))
    assert seen == [[pytest.approx(0.001)], [0.0]]


def test_reverse_sde_matches_euler_maruyama_reference():
    t_start = torch.tensor([0.004, 0.0025, 0.004], dtype=torch.float64)  # 0.0025: a shorter first step
    x_t = start(3, 1.0)
    out, n = ReverseSDE().sample(time_model, x_t, t_start, gens(3))
    assert n.tolist() == [4, 3, 4]
    for b, g in enumerate(gens(3)):
        x, t0 = x_t[b : b + 1].clone(), float(t_start[b])
        for j in range(math.ceil(t0 / 1e-3 - 1e-6), 0, -1):
            t = min(t0, j * 1e-3)
            h = t - (j - 1) * 1e-3
            beta = 0.1 + 19.9 * t
            eps = time_model(x, torch.tensor([t], dtype=torch.float32))
            score = -eps / math.sqrt(1 - abar(t))
            x = x + (0.5 * beta * x + beta * score) * h + math.sqrt(beta * h) * draw(g)
        torch.testing.assert_close(out[b : b + 1], x, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_matches_reference(eta):
    t_start = torch.tensor([0.2, 0.004, 0.2], dtype=torch.float64)
    x_t = start(3, 1.0)
    out, n = DDIM(steps=5, eta=eta).sample(time_model, x_t, t_start, gens(3))
    assert n.tolist() == [5, 4, 5]
    for b, g in enumerate(gens(3)):
        x, t0, k = x_t[b : b + 1].clone(), float(t_start[b]), int(n[b])
        for j in range(k):
            t, tn = t0 * (1 - j / k), max(0.0, t0 * (1 - (j + 1) / k))
            a, an = abar(t), abar(tn)
            eps = time_model(x, torch.tensor([t], dtype=torch.float32))
            x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
            sigma = eta * math.sqrt((1 - an) / (1 - a) * (1 - a / an))
            x = math.sqrt(an) * x0 + math.sqrt(1 - an - sigma**2) * eps
            if eta > 0:
                x = x + sigma * draw(g)
        torch.testing.assert_close(out[b : b + 1], x, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("sampler", "evals", "var_rel"),
    [(ReverseSDE(), [500, 300], 0.04), (DDPMAncestral(clip_denoised=False), [500, 300], 0.05),
     (DDIM(steps=100), [100, 100], 0.05)],
)
def test_samplers_with_perfect_score_recover_gaussian_data(sampler, evals, var_rel):
    """Half the batch starts at the t = 0.5 marginal, half at t = 0.3; both land on N(m, s^2)."""
    m, s = 0.25, 0.45
    den = Counting(GaussianDenoiser(m, s))
    t_start = torch.tensor([0.5] * 4 + [0.3] * 4, dtype=torch.float64)
    a = LINEAR.alpha_bars[LINEAR.steps(t_start)].float().view(-1, 1, 1, 1)
    g = torch.Generator().manual_seed(3)
    x_t = a.sqrt() * m + (a * s**2 + 1 - a).sqrt() * torch.randn(8, 3, 32, 32, generator=g)
    out, n = sampler.sample(den, x_t, t_start, gens(8))
    assert n.tolist() == [evals[0]] * 4 + [evals[1]] * 4
    assert den.rows == int(n.sum()) and len(den.calls) == max(evals)
    for grp in (out[:4], out[4:]):
        assert abs(float(grp.mean()) - m) < 0.015
        assert float(grp.var()) == pytest.approx(s**2, rel=var_rel)


def test_sampler_groups_by_start_time_and_late_starters_join():
    den = Counting(TinyDenoiser())
    t_start = torch.tensor([0.005, 0.002, 0.005, 0.0], dtype=torch.float64)
    out, n = ReverseSDE().sample(den, torch.zeros(4, 3, 16, 16), t_start, gens(4))
    assert n.tolist() == [5, 2, 5, 0]
    assert [b for b, _ in den.calls] == [2, 2, 2, 3, 3]  # two images from t = 0.005, the third joins at 0.002
    torch.testing.assert_close(den.calls[0][1], torch.tensor([0.005, 0.005], dtype=torch.float64))
    assert torch.equal(out[3], torch.zeros(3, 16, 16))  # t_start = 0: untouched, no evaluation


def test_ddim_is_deterministic_and_uses_its_step_count():
    den = Counting(TinyDenoiser())
    x = torch.randn(3, 3, 16, 16)
    t = torch.tensor([0.2, 0.2, 0.004], dtype=torch.float64)
    a, n = DDIM(steps=10).sample(den, x, t, gens(3))
    b, _ = DDIM(steps=10).sample(den, x, t, gens(3, offset=50))
    assert n.tolist() == [10, 10, 4] and len(den.calls) == 20
    torch.testing.assert_close(a, b)
