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
    for _ in range(300):
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


def test_checkpoints_follow_the_published_schedule():
    # p = 0, 0.22, 0.41, 0.57, 0.70, 0.80, 0.87, 0.93, 0.99, 1.05 -> iterations of a 100-step run
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]


def test_robust_accuracy_agrees_with_torchattacks(classifier):
    model, x, y = classifier
    clean = (model(x).argmax(1) == y).float().mean().item()
    assert clean > 0.9
    eps = 3 / 255
    ours = APGD(eps=eps, steps=50, initial_step=2.0, random_start=True, seed=0)
    x_ours, _ = ours.perturb(lambda v, idx: F.cross_entropy(model(v), y[idx], reduction="none"), x)
    ref = torchattacks.APGD(model, norm="Linf", eps=eps, steps=50, n_restarts=1, loss="ce", rho=0.75, seed=0)
    x_ref = ref(x, y)
    acc_ours = (model(x_ours).argmax(1) == y).float().mean().item()
    acc_ref = (model(x_ref).argmax(1) == y).float().mean().item()
    # the setting is chosen so that the attack is neither trivial nor hopeless
    assert 0.05 < acc_ref < clean - 0.2, (clean, acc_ref)
    assert abs(acc_ours - acc_ref) <= 0.05, (acc_ours, acc_ref)
    check_invariants(x_ours, x, eps)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_invariants_hold_exactly_in_every_precision(classifier, dtype):
    model, x, y = classifier
    eps = 4 / 255
    attack = APGD(eps=eps, steps=5, initial_step=1.0, dtype=dtype)
    x_adv, _ = attack.perturb(lambda v, idx: F.cross_entropy(model(v), y[idx], reduction="none"), x[:32])
    assert x_adv.dtype == torch.float32
    rows = check_invariants(x_adv, x[:32], eps)
    assert all(r["ok"] for r in rows)
    assert max(r["linf"] for r in rows) > 0.5 * eps  # it did move


def test_returns_the_best_iterate_and_its_loss(classifier):
    model, x, y = classifier

    def loss(v, idx):
        return F.cross_entropy(model(v), y[idx], reduction="none")

    x_adv, best = APGD(eps=2 / 255, steps=10).perturb(loss, x[:16])
    with torch.no_grad():
        assert torch.allclose(loss(x_adv, torch.arange(16)), best, atol=1e-5)
        assert (best >= loss(x[:16], torch.arange(16)) - 1e-6).all()


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
