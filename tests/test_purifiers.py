"""The DiffPure / DiffCAP purifiers on tiny stand-in denoisers and encoders, against reference walks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffcap.base import PurifyInfo
from diffcap.purifiers import DiffCAP, DiffPure, bpda
from diffcap.samplers import DDIM, Sampler
from diffcap.schedule import Schedule
from tests.standins import Counting, TinyDenoiser, gens
from tests.test_schedule import AC, BETAS


class PixelEncoder:
    """phi = the mean-free pixels: the consecutive similarity depends on the image's contrast."""

    def __init__(self):
        self.rows = 0

    def embed(self, y: torch.Tensor) -> torch.Tensor:
        self.rows += y.shape[0]
        return (y - y.mean((1, 2, 3), keepdim=True)).flatten(1)


class PatternEncoder:
    """A stand-in VLM encoder that an "adversarial" checkerboard P destabilises, by construction.

    It estimates the pattern's amplitude a and the noise variance nu (from neighbour differences of the
    image with the pattern removed) and embeds at the angle gain * log(1 + a^2 / (nu + 1e-4)). Without the
    pattern the angle stays ~0 (stable at once); with it the angle falls as noise accumulates, by
    ~gain / (k + 1) per step, so the walk goes on until the pattern is drowned.
    """

    def __init__(self, size: int, gain: float = 0.6):
        i = torch.arange(size)
        self.pattern = ((-1.0) ** (i[:, None] + i[None, :])).expand(1, 3, size, size)
        self.gain = gain

    def embed(self, y: torch.Tensor) -> torch.Tensor:
        u = 2 * y - 1
        u = u - u.mean((1, 2, 3), keepdim=True)
        a = (u * self.pattern).mean((1, 2, 3))
        r = u - a.view(-1, 1, 1, 1) * self.pattern
        nu = ((r[..., 1:] - r[..., :-1]) ** 2).mean((1, 2, 3)) / 2
        theta = self.gain * torch.log1p(a**2 / (nu + 1e-4))
        return torch.stack([theta.cos(), theta.sin()], 1)


class TinyVLM(nn.Module):
    """Only what DiffCAP needs of a VLM: ``embed``."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 4)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(x.mean((2, 3))), dim=1)


def smooth_images(contrasts: list[float], size: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    base = F.interpolate(torch.randn(1, 3, 4, 4, generator=g), size=(size, size), mode="bilinear")
    base = base / base.std()
    return torch.cat([(0.5 + c * base).clamp(0, 1) for c in contrasts])


def ramp(size: int) -> torch.Tensor:
    j = torch.linspace(-0.5, 0.5, size)
    return (0.5 + 0.4 * j.view(1, 1, 1, size)).expand(1, 3, size, size).clone()


# ----------------------------------------------------------------------------------------------- DiffPure


def test_diffpure_noises_to_t_star_and_uses_t_star_over_dt_evals():
    den = Counting(TinyDenoiser(resolution=32))
    p = DiffPure(den, t_star=0.15)
    x = torch.full((4, 3, 32, 32), 0.5)  # maps to 0 in [-1, 1], so the first state is pure scaled noise
    first = {}
    orig = den.forward

    def spy(xx, t):
        first.setdefault("x", xx.clone())
        return orig(xx, t)

    den.forward = spy
    y, infos = p.purify(x, gens(4))
    assert [i.denoiser_evals for i in infos] == [150] * 4 and len(den.calls) == 150 and den.rows == 600
    torch.testing.assert_close(den.calls[0][1], torch.full((4,), 0.15, dtype=torch.float64))
    assert float(den.calls[-1][1].max()) == pytest.approx(0.001)
    assert float(first["x"].std()) == pytest.approx(math.sqrt(1 - AC[149]), rel=0.03)
    assert all(i.t == 0.15 and i.encoder_evals == 0 and i.converged for i in infos)
    assert y.shape == x.shape and 0 <= float(y.min()) and float(y.max()) <= 1
    assert p.randomized


# ----------------------------------------------------------------------------------------------- DiffCAP


class Spy(Sampler):
    """Records what a purifier hands the reverse pass and returns it unchanged (no evaluations)."""

    def __init__(self):
        self.x_t, self.t_start = None, None

    def num_evals(self, t_start, sched=None):
        return torch.zeros(len(t_start), dtype=torch.long)

    def sample(self, denoiser, x_t, t_start, generators):
        self.x_t, self.t_start = x_t.clone(), torch.as_tensor(t_start).clone()
        return x_t, self.num_evals(t_start)


def draw(g: torch.Generator, res: int) -> torch.Tensor:
    return torch.randn((1, 3, res, res), generator=g, dtype=torch.float32)


def test_diffpure_noises_with_the_discrete_alphas_cumprod():
    """DiffPure: x_t = sqrt(alphas_cumprod[k* - 1]) x0 + sqrt(1 - ...) e with k* = 150, then reverse from t*."""
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    spy = Spy()
    DiffPure(TinyDenoiser(), t_star=0.15, sampler=spy).purify(x, gens(3))
    assert spy.t_start.tolist() == [0.15] * 3
    for b, g in enumerate(gens(3)):
        want = math.sqrt(AC[149]) * (2 * x[b : b + 1] - 1) + math.sqrt(1 - AC[149]) * draw(g, 16)
        torch.testing.assert_close(spy.x_t[b : b + 1], want, rtol=0, atol=1e-6)
    # the schedule is the denoiser's own
    den = TinyDenoiser()
    den.schedule = Schedule(500, 0.1, 20.0)
    DiffPure(den, t_star=0.15, sampler=spy).purify(x, gens(3))
    a = float(Schedule(500, 0.1, 20.0).alpha_bars[75])
    want = math.sqrt(a) * (2 * x[:1] - 1) + math.sqrt(1 - a) * draw(gens(1)[0], 16)
    torch.testing.assert_close(spy.x_t[:1], want, rtol=0, atol=1e-6)


def reference_walk(x: torch.Tensor, g: torch.Generator, enc, tau: float, res: int, keep: str, max_moves: int,
                   antialias: bool) -> tuple[torch.Tensor, int, int, bool]:
    """DiffCAP for one image, one DDPM step per move: (kept state, its step count, moves walked, converged)."""
    size = x.shape[-1]

    def resize(u, n):
        return F.interpolate(u, size=(n, n), mode="bilinear", align_corners=False, antialias=antialias)

    def phi(z):
        e = enc.embed(resize(((z + 1) / 2).clamp(0, 1), size).clamp(0, 1)).flatten(1)
        return e / e.norm()

    cur = resize(x, res) * 2 - 1
    prev, e_prev = cur, phi(cur)
    for m in range(1, max_moves + 1):
        b = BETAS[m - 1]
        cur = math.sqrt(1 - b) * cur + math.sqrt(b) * draw(g, res)
        e = phi(cur)
        if float((e * e_prev).sum()) > tau:
            return (prev, m - 1, m, True) if keep == "before" else (cur, m, m, True)
        prev, e_prev = cur, e
    return cur, max_moves, max_moves, False


@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("keep", ["before", "after"])
def test_diffcap_hands_the_reference_walks_state_to_the_reverse_pass(keep, antialias):
    """Per image: the state, time and stopping move of an independent step-by-step walk (24 px in, 16 px model)."""
    x = smooth_images([0.01, 0.005, 0.003, 0.0005, 0.0], size=24)
    spy, enc = Spy(), PixelEncoder()
    p = DiffCAP(TinyDenoiser(resolution=16), tau=0.95, encoder="clip", encoder_model=enc, t_max=0.016, keep=keep,
                sampler=spy, antialias=antialias)
    _, infos = p.purify(x, gens(5))
    steps = []
    for b, g in enumerate(gens(5)):
        kept, k, moves, conv = reference_walk(x[b : b + 1], g, enc, 0.95, 16, keep, 16, antialias)
        torch.testing.assert_close(spy.x_t[b : b + 1], kept, rtol=0, atol=1e-5)
        assert spy.t_start[b].item() == pytest.approx(k / 1000) and infos[b].t == pytest.approx(k / 1000)
        assert (infos[b].steps, infos[b].converged) == (moves, conv)
        steps.append(moves)
    assert len(set(steps)) >= 3 and not all(i.converged for i in infos)  # stops differ, one hits the cap


def test_walk_without_stopping_records_every_similarity():
    """The calibration walk: every image walks all moves; its similarities are those of the stopping walk."""
    x = smooth_images([0.01, 0.003], size=24)
    p = DiffCAP(TinyDenoiser(), tau=0.95, encoder="clip", encoder_model=PixelEncoder(), t_max=0.3)
    full = p.walk(x, gens(2), until_stable=False, moves=30)
    stopping = p.walk(x, gens(2))
    assert full.similarities.shape == (2, 30) and not full.similarities.isnan().any()
    assert (full.moves == 30).all() and (full.encoder_evals == 31).all()
    for b in range(2):
        n = int(stopping.moves[b])
        assert n < 30
        torch.testing.assert_close(stopping.similarities[b, :n], full.similarities[b, :n])
        assert stopping.similarities[b, n:].isnan().all()
        assert stopping.converged[b] and full.similarities[b, n - 1] > 0.95 >= full.similarities[b, : n - 1].max()
    with pytest.raises(ValueError, match="moves"):
        p.walk(x, gens(2), moves=1001)


def test_diffcap_batched_equals_one_at_a_time():
    """Same generators: same per-image stopping steps, times, evaluation counts and (up to float) outputs."""
    x = smooth_images([0.04, 0.03, 0.025, 0.02, 0.01, 0.0])
    make = lambda den, enc: DiffCAP(den, tau=0.99, encoder="clip", encoder_model=enc, t_max=0.095)  # noqa: E731
    den, enc = Counting(TinyDenoiser()), PixelEncoder()
    y, infos = make(den, enc).purify(x, gens(6))
    steps = [i.steps for i in infos]
    assert len(set(steps)) >= 4, steps  # the stopping times really differ across the batch
    assert any(not i.converged for i in infos) and any(i.converged for i in infos)
    # evaluation counts equal the rows the denoiser and the encoder actually saw, with no wasted call
    assert den.rows == sum(i.denoiser_evals for i in infos)
    assert len(den.calls) == max(i.denoiser_evals for i in infos)
    assert enc.rows == sum(i.encoder_evals for i in infos)
    for i in range(6):
        d1, e1 = Counting(TinyDenoiser()), PixelEncoder()
        yi, (info,) = make(d1, e1).purify(x[i : i + 1], gens(6)[i : i + 1])
        for key in ("t", "steps", "denoiser_evals", "encoder_evals", "converged"):
            assert getattr(info, key) == getattr(infos[i], key), (i, key)
        assert info.denoiser_evals == len(d1.calls) and info.encoder_evals == e1.rows
        torch.testing.assert_close(yi[0], y[i], atol=1e-5, rtol=0)


def test_diffcap_clean_stops_early_adversarial_walks_longer():
    enc = PatternEncoder(32)
    clean = ramp(32)
    adv = clean + 0.05 * enc.pattern
    p = DiffCAP(TinyDenoiser(resolution=32), tau=0.999, encoder="clip", encoder_model=enc, t_max=0.1)
    _, (ic, ia) = p.purify(torch.cat([clean, adv]), gens(2))
    assert ic.steps == 1 and ic.t == 0.0 and ic.denoiser_evals == 0 and ic.converged
    assert ia.converged and 8 <= ia.steps <= 40 and ia.t == pytest.approx((ia.steps - 1) / 1000)
    assert ia.denoiser_evals == ia.steps - 1 and ia.encoder_evals == ia.steps + 1


def test_diffcap_t_max_cap_gives_not_converged():
    enc = PatternEncoder(32)
    adv = ramp(32) + 0.05 * enc.pattern
    p = DiffCAP(TinyDenoiser(resolution=32), tau=0.999, encoder="clip", encoder_model=enc, t_max=0.004)
    _, (info,) = p.purify(adv, gens(1))
    assert not info.converged and info.steps == 4 and info.t == pytest.approx(0.004)
    assert info.encoder_evals == 5 and info.denoiser_evals == 4


@pytest.mark.parametrize(("step", "check_every"), [(1, 1), (2, 1), (1, 3)])
def test_diffcap_keep_before_and_after_differ_by_one_check(step, check_every):
    x = smooth_images([0.03, 0.02, 0.0])
    out = {}
    for keep in ("before", "after"):
        p = DiffCAP(TinyDenoiser(), tau=0.98, encoder="clip", encoder_model=PixelEncoder(), keep=keep, step=step,
                    check_every=check_every, t_max=0.3)
        out[keep] = p.purify(x, gens(3))[1]
    for b, a in zip(out["before"], out["after"], strict=True):
        assert b.converged and a.converged and b.steps == a.steps
        assert round((a.t - b.t) * 1000) == step * check_every
        assert a.denoiser_evals - b.denoiser_evals == step * check_every
        assert round(a.t * 1000) == a.steps * step


def test_diffcap_resize_path_and_output_range():
    x = torch.rand(2, 3, 24, 24)
    for p in (
        DiffCAP(TinyDenoiser(resolution=16), tau=0.95, encoder="clip", encoder_model=PixelEncoder(), t_max=0.05),
        DiffPure(TinyDenoiser(resolution=16), t_star=0.02, sampler=DDIM(steps=5)),
    ):
        y, infos = p.purify(x, gens(2))
        assert y.shape == x.shape and y.dtype == torch.float32
        assert float(y.min()) >= 0 and float(y.max()) <= 1 and torch.isfinite(y).all()
        assert len(infos) == 2 and all(isinstance(i, PurifyInfo) and i.seconds >= 0 for i in infos)


def test_diffcap_vlm_encoder_needs_attach_and_is_not_a_submodule():
    p = DiffCAP(TinyDenoiser(), tau=0.9, t_max=0.01)
    with pytest.raises(RuntimeError, match="attach"):
        p.purify(torch.rand(1, 3, 16, 16), gens(1))
    vlm = TinyVLM()
    p.attach(vlm)
    y, (info,) = p.purify(torch.rand(1, 3, 16, 16), gens(1))
    assert info.encoder_evals >= 2 and not any(k.startswith("_vlm") for k in p.state_dict())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tau": 1.3}, r"defense\.tau must be in \(0, 1\), got 1.3"),
        ({"tau": 0.0}, r"defense\.tau must be in \(0, 1\), got 0.0"),
        ({"t_max": 0.0}, r"defense\.t_max must be in \(0, 1\], got 0.0"),
        ({"t_max": 1.5}, r"defense\.t_max must be in \(0, 1\], got 1.5"),
        ({"step": 0}, r"defense\.step must be an integer >= 1, got 0"),
        ({"keep": "middle"}, r"defense\.keep must be"),
        ({"encoder": "clip"}, r"defense\.encoder_model must be given"),
        ({"t_max": 0.001, "step": 5}, r"defense\.t_max=0.001 is shorter than one forward move"),
    ],
)
def test_diffcap_rejects_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DiffCAP(TinyDenoiser(), **kwargs)


@pytest.mark.parametrize("t_star", [0.0, 1.2])
def test_diffpure_rejects_bad_t_star(t_star):
    with pytest.raises(ValueError, match=rf"defense\.t_star must be in \(0, 1\], got {t_star}"):
        DiffPure(TinyDenoiser(), t_star=t_star)
    with pytest.raises(ValueError, match=r"defense\.t_star=0.0004 is shorter than one of the 1000 steps"):
        DiffPure(TinyDenoiser(), t_star=0.0004)


def test_bpda_is_purified_forward_and_identity_backward():
    p = DiffPure(TinyDenoiser(), t_star=0.01)
    x = torch.rand(2, 3, 16, 16, requires_grad=True)
    y = bpda(p, x, gens(2))
    expected, _ = p.purify(x.detach(), gens(2))
    torch.testing.assert_close(y.detach(), expected)
    (y * torch.arange(3.0).view(1, 3, 1, 1)).sum().backward()
    torch.testing.assert_close(x.grad, torch.arange(3.0).view(1, 3, 1, 1).expand(2, 3, 16, 16))


def test_built_by_hydra_from_a_config():
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(
        {
            "_target_": "diffcap.purifiers.DiffCAP",
            "denoiser": {"_target_": "tests.standins.TinyDenoiser", "resolution": 16},
            "sampler": {"_target_": "diffcap.samplers.DDIM", "steps": 4},
            "tau": 0.9,
            "t_max": 0.02,
            "step": 2,
        }
    )
    p = instantiate(cfg)
    assert isinstance(p, DiffCAP) and p.sampler == DDIM(steps=4) and p.max_moves == 10
    p.attach(TinyVLM())
    y, infos = p.purify(torch.rand(2, 3, 16, 16), gens(2))
    assert y.shape == (2, 3, 16, 16) and all(i.denoiser_evals <= 4 for i in infos)
    with pytest.raises(Exception, match=r"defense\.tau must be in \(0, 1\), got 1.3"):
        instantiate(cfg, tau=1.3)


def test_seconds_share_the_batch_wall_time():
    import time

    p = DiffCAP(TinyDenoiser(), tau=0.99, encoder="clip", encoder_model=PixelEncoder(), t_max=0.05)
    start = time.perf_counter()
    _, infos = p.purify(smooth_images([0.04, 0.0, 0.0]), gens(3))
    wall = time.perf_counter() - start
    assert 0 < sum(i.seconds for i in infos) <= wall
    # the image that stopped at once costs less than those that walked and were denoised
    assert infos[0].steps < infos[1].steps and infos[0].seconds < infos[1].seconds


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_diffcap_on_gpu_matches_cpu_with_cpu_generators():
    x = smooth_images([0.04, 0.02, 0.0])
    res = {}
    for dev in ("cpu", "cuda"):
        p = DiffCAP(TinyDenoiser(), tau=0.98, encoder="clip", encoder_model=PixelEncoder(), t_max=0.1).to(dev)
        y, infos = p.purify(x.to(dev), gens(3))
        assert y.device.type == dev
        res[dev] = (y.cpu(), [(i.steps, i.t, i.converged) for i in infos])
    assert res["cpu"][1] == res["cuda"][1]
    torch.testing.assert_close(res["cpu"][0], res["cuda"][0], atol=1e-3, rtol=0)
