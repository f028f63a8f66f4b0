"""APGD against torchattacks' APGD on a small classifier, the step-size checkpoints, and the threat-model
invariants in every precision."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
import torchattacks
from torch import nn

from attacks.apgd import APGD, checkpoints
from attacks.base import check_invariants


def make_classifier(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A small conv net trained in a few seconds on 10 noisy texture classes (3x16x16 images in [0, 1])."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.rand(10, 3, 16, 16, generator=g)

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, 10, (n,), generator=g)
        x = (0.5 * protos[y] + 0.25 + 0.1 * torch.randn(n, 3, 16, 16, generator=g)).clamp(0, 1)
        return x, y

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 32, 3, padding=1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(128, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        x, y = sample(64)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval().requires_grad_(False)
    x, y = sample(200)
    return model, x, y


@pytest.fixture(scope="module")
def classifier():
    torch.set_num_threads(1)
    return make_classifier()


def test_checkpoints_follow_autoattacks_integer_schedule():
    # windows 22, 19, 16, 13, 10, 7, 6, 6 for 100 iterations; 2, then 1 each for 10
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert checkpoints(10) == [2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert checkpoints(50) == [11, 21, 30, 38, 45]  # windows 11, 10, 9, 8, 7


class Recorder(nn.Module):
    """The classifier, remembering every batch it is called with (torchattacks' iterates)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.inputs = model, []

    def forward(self, v):
        self.inputs.append(v.detach().clone())
        return self.model(v)


@pytest.mark.parametrize("steps", [100, 10])
def test_loss_and_step_size_agree_with_torchattacks_iteration_by_iteration(classifier, steps):
    """Same start, same model: every iterate's loss equals torchattacks' (so do momentum, step halving,
    restarts from the best point), the returned image is its best iterate, and step halving did happen."""
    model, x, y = classifier
    x, y = x[:48], y[:48]
    eps = 8 / 255
    rec = Recorder(model)
    ref = torchattacks.APGD(rec, norm="Linf", eps=eps, steps=steps, n_restarts=1, loss="ce", rho=0.75, seed=0)
    torch.manual_seed(0)
    x_best_ref, _, loss_best_ref, _ = ref.attack_single_run(x, y)
    with torch.no_grad():
        ref_losses = torch.stack([F.cross_entropy(model(v), y, reduction="none") for v in rec.inputs])
    assert ref_losses.shape == (steps + 1, 48)

    def loss(v, idx):
        return F.cross_entropy(model(v), y[idx], reduction="none")

    trace: dict = {}
    ours = APGD(eps=eps, steps=steps, initial_step=2.0)
    x_ours, loss_ours = ours.perturb(loss, x, x_init=rec.inputs[0], trace=trace)
    ours_losses = torch.stack(trace["loss"])
    assert torch.allclose(ours_losses, ref_losses, rtol=0, atol=1e-5), (ours_losses - ref_losses).abs().max()
    assert torch.allclose(x_ours, x_best_ref, rtol=0, atol=1e-6)
    assert torch.allclose(loss_ours, loss_best_ref, rtol=0, atol=1e-5)
    steps_taken = torch.stack(trace["step"])
    assert torch.equal(steps_taken[0], torch.full((48,), 2 * eps))
    assert (steps_taken[-1] < 2 * eps).any() and (steps_taken[-1] <= eps / 2).any()  # halvings happened
    # the step sizes only ever halve, at the checkpoints
    ratios = (steps_taken[1:] / steps_taken[:-1]).unique()
    assert set(ratios.tolist()) <= {1.0, 0.5}
    changed = [k for k in range(1, steps + 1) if not torch.equal(steps_taken[k], steps_taken[k - 1])]
    assert set(changed) <= {m + 1 for m in checkpoints(steps)}


def test_first_step_is_initial_step_times_eps_and_momentum_follows():
    """From x - eps*sign(w), a linear loss moves by initial_step*eps; then the second iterate is
    alpha * (new step) + (1 - alpha) * (previous move), alpha = 0.75 (Croce and Hein)."""
    x = torch.full((2, 3, 4, 4), 0.5)
    w = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    eps = 8 / 255
    start = x - eps * w.sign()
    seen: list = []

    def linear(v, idx):
        seen.append(v.detach().clone())
        return (v * w[idx]).flatten(1).sum(1)

    for initial, expected in ((1.0, x), (2.0, x + eps * w.sign()), (0.25, start + 0.25 * eps * w.sign())):
        seen.clear()
        APGD(eps=eps, steps=2, initial_step=initial).perturb(linear, x, x_init=start)
        assert torch.allclose(seen[1], expected, atol=1e-7), initial

    def bowl(v, idx):  # maximum at x: the first step overshoots, the second points back
        seen.append(v.detach().clone())
        return -((v - x[idx]) ** 2).flatten(1).sum(1)

    seen.clear()
    APGD(eps=eps, steps=10, initial_step=1.0).perturb(bowl, x, x_init=x - 0.3 * eps)  # first check after 2
    assert torch.allclose(seen[1], x + 0.7 * eps, atol=1e-7)
    # 0.75 * (-eps) + 0.25 * (+eps) from x + 0.7 eps
    assert torch.allclose(seen[2], x + 0.2 * eps, atol=1e-7)


def test_random_start_is_autoattacks_and_per_sample():
    x = torch.full((3, 3, 8, 8), 0.5)
    eps = 4 / 255
    seen = []

    def loss(v, idx):
        seen.append(v.detach().clone())
        return v.flatten(1).sum(1)

    gens = [torch.Generator().manual_seed(s) for s in (1, 2, 1)]
    APGD(eps=eps, steps=1, random_start=True).perturb(loss, x, generators=gens)
    start = seen[0]
    d = (start - x).flatten(1)
    assert torch.allclose(d.abs().amax(1), torch.full((3,), eps), atol=1e-7)  # scaled to the sphere's max-norm
    assert torch.equal(start[0], start[2]) and not torch.equal(start[0], start[1])
    t = 2 * torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(2)) - 1
    assert torch.allclose(start[1], (x[1] + eps * t / t.abs().max()).clamp(0, 1), atol=1e-7)
    seen.clear()
    APGD(eps=eps, steps=1, random_start=False).perturb(loss, x)
    assert torch.equal(seen[0], x)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_invariants_hold_exactly_in_every_precision(classifier, dtype):
    model, x, y = classifier
    eps = 4 / 255
    attack = APGD(eps=eps, steps=5, initial_step=1.0, dtype=dtype, random_start=True)
    seen = set()

    def loss(v, idx):
        on = torch.is_autocast_enabled("cpu")
        seen.add(str(torch.get_autocast_dtype("cpu")).replace("torch.", "") if on else "float32")
        return F.cross_entropy(model(v), y[idx], reduction="none")

    x_adv, _ = attack.perturb(loss, x[:32])
    assert seen == {dtype}  # the loss really ran in the requested precision
    assert x_adv.dtype == torch.float32
    rows = check_invariants(x_adv, x[:32], eps)
    assert all(r["ok"] for r in rows)
    assert max(r["linf_255"] for r in rows) > 0.5 * 4  # it did move


def test_returns_the_best_iterate_and_its_loss(classifier):
    """Per sample, the iterate with the highest loss of all evaluated points (the start included)."""
    model, x, y = classifier
    seen: list = []

    def loss(v, idx):
        out = F.cross_entropy(model(v), y[idx], reduction="none")
        seen.append((v.detach().clone(), out.detach().clone()))
        return out

    x_adv, best = APGD(eps=8 / 255, steps=10).perturb(loss, x[:16])
    points = torch.stack([v for v, _ in seen])  # (steps + 1, 16, ...)
    losses = torch.stack([o for _, o in seen])
    k = losses.argmax(0)
    assert (k > 0).all() and (k < 10).any()  # the attack improved on the start; the best is not always last
    assert torch.equal(x_adv, points[k, torch.arange(16)])
    assert torch.allclose(best, losses.amax(0))


def test_zero_gradient_and_out_of_range_inputs_warn(caplog):
    with caplog.at_level(logging.WARNING):
        APGD(eps=4 / 255, steps=2).perturb(lambda v, idx: torch.zeros(v.shape[0]) + 0 * v.sum((1, 2, 3)),
                                           torch.rand(3, 3, 8, 8) * 1.5)
    text = caplog.text
    assert "zero gradient for 3 of 3 samples" in text
    assert "outside [0, 1]" in text


def test_eps_out_of_range_is_a_clear_error():
    with pytest.raises(ValueError, match="attack.eps is in 1/255 units"):
        APGD(eps=100 / 255)


@pytest.mark.parametrize("steps, losses, upto, halved_after", [
    # 10 steps: checks after iterations 2, 3, ..., 10 (windows 2, then 1). Window 2 halves with <= 1 rise of 2
    # (rho 0.75: 1.5); a window of 1 halves without a rise; the stall rule halves where the previous check
    # did not halve and the best loss did not improve since.
    (10, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 10, []),  # always rising: never halved
    (10, [0, 1, 0.5, 2, 3, 4, 5, 6, 7, 8, 9], 10, [2]),  # one rise in the first window: halved at 2
    # a fall then a rise halves at 2; at 4 the stall rule (no halving at 3, best still 5) halves; not at 5
    (10, [5, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 10, [2, 4]),
    (10, [0, 1, 2, 3, 2.5, 4, 5, 6, 7, 8, 9], 10, [4]),  # a fall in a window of one (rises reset per window)
    (20, [0, 1, 2, 3, 2.5] + list(range(4, 20)), 4, [4]),  # 3 rises of 4 = rho * 4: halved (<=, not <)
    (25, [5, 1, 2, 3, 4, 4.5] + list(range(6, 26)), 5, []),  # no stall rule at the first check
    # windows 4, 3: 4 rises, then 2 of 3 with a new best: halved at 7 by the rise count alone (counted per window)
    (20, [0, 1, 2, 3, 4, 5, 4.5, 6] + list(range(7, 20)), 7, [7]),
])
def test_step_halving_rules_on_scripted_losses(steps, losses, upto, halved_after):
    """Loss values scripted per call (zero gradient: the iterate stays put), so only the rules decide."""
    calls = [0]

    def scripted(v, idx):
        value = torch.full((v.shape[0],), float(losses[calls[0]])) + 0 * v.flatten(1).sum(1)
        calls[0] += 1
        return value

    trace: dict = {}
    APGD(eps=4 / 255, steps=steps, initial_step=2.0).perturb(scripted, torch.full((1, 3, 2, 2), 0.5), trace=trace)
    sizes = [float(s[0]) for s in trace["step"]]
    # trace["step"][k] is the step used to reach iterate k; a halving after iteration m shows from k = m + 1
    got = [k - 1 for k in range(2, min(upto + 2, steps + 1)) if sizes[k] < sizes[k - 1]]
    assert got == halved_after, sizes
