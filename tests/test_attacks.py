"""The schedule runner (keep-worst, early stop, starts), BPDA+EOT gradients, and the adversarial cache."""

from __future__ import annotations

import logging

import pytest
import torch

from attacks.apgd import APGD
from attacks.base import InvariantError, Objective, Stage, check_invariants
from attacks.bpda_eot import BPDAEOT
from attacks.cache import AdversarialCache
from attacks.schedule import ScheduleAttack
from diffcap.base import Purifier, PurifyInfo
from diffcap.purifiers import bpda
from evaluators.seeding import derive_seed, generators

EPS = 4 / 255


def test_invariant_violation_is_an_error():
    x = torch.rand(2, 3, 4, 4) * 0.5 + 0.25
    with pytest.raises(InvariantError, match="violates the threat model"):
        check_invariants(x + 5 / 255, x, EPS)
    with pytest.raises(InvariantError):
        check_invariants((x + 2 / 255).clamp(max=0.9).index_fill(0, torch.tensor([0]), 1.2), x, EPS)


def test_schedule_keeps_the_worst_image_and_stops_broken_samples():
    torch.manual_seed(0)
    x = torch.rand(4, 3, 4, 4) * 0.5 + 0.25
    calls = {"a": [], "b": []}
    direction = torch.randn(4, 3, 4, 4)

    def loss_a(v, idx):  # pushes along +direction
        calls["a"].append(idx.tolist())
        return (v * direction[idx]).flatten(1).sum(1)

    def loss_b(v, idx):  # pushes the other way
        calls["b"].append(idx.tolist())
        return -(v * direction[idx]).flatten(1).sum(1)

    def score(v, idx):  # lower = better attack; sample 0 is "broken" by stage a
        s = -(v - x[idx]).mul(direction[idx]).flatten(1).sum(1)
        s[idx == 3] = 5.0  # sample 3 cannot be broken
        return s

    objective = Objective(stages=[Stage("a", loss_a), Stage("b", loss_b, start="best")], score=score,
                          success_below=-0.05)
    x_adv, info = ScheduleAttack(APGD(eps=EPS, steps=3, initial_step=1.0))(objective, x)
    assert [i["kept_stage"] for i in info[:3]] == ["a", "a", "a"]
    assert info[3]["kept_stage"] == "clean" and info[3]["score_final"] == 5.0
    # samples 0-2 broke in stage a (score <= -0.05) and left; only sample 3 ran stage b
    assert all(i == [3] for i in calls["b"])
    assert [i["stages_run"] for i in info] == [1, 1, 1, 2]
    check_invariants(x_adv, x, EPS)


def test_samples_already_broken_on_clean_images_are_not_attacked():
    x = torch.rand(2, 3, 4, 4)
    n_calls = []

    def loss(v, idx):
        n_calls.append(1)
        return v.flatten(1).sum(1)

    objective = Objective([Stage("s", loss)], score=lambda v, idx: torch.zeros(len(idx)), success_below=0.0)
    x_adv, info = ScheduleAttack(APGD(eps=EPS, steps=2))(objective, x)
    assert not n_calls and torch.equal(x_adv, x) and info[0]["stages_run"] == 0


class Blur(Purifier):
    """Deterministic stand-in purifier."""

    def purify(self, x, generators):
        y = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
        return y, [PurifyInfo() for _ in range(x.shape[0])]


class NoisyBlur(Blur):
    randomized = True

    def purify(self, x, generators):
        y, info = super().purify(x, generators)
        noise = torch.stack([torch.randn(x.shape[1:], generator=g) for g in generators])
        return (y + 0.05 * noise).clamp(0, 1), info


def quadratic_loss(target: torch.Tensor):
    return lambda v, idx: -((v - target[idx]) ** 2).flatten(1).sum(1) + (v**3).flatten(1).sum(1)


def test_bpda_gradient_equals_the_gradient_at_the_purified_image():
    torch.manual_seed(0)
    x = torch.rand(3, 3, 8, 8)
    target = torch.rand(3, 3, 8, 8)
    loss = quadratic_loss(target)
    xb = x.clone().requires_grad_(True)
    (g_bpda,) = torch.autograd.grad(loss(bpda(Blur(), xb, generators([0, 1, 2])), torch.arange(3)).sum(), xb)
    x_pur = Blur().purify(x, None)[0].requires_grad_(True)
    (g_pur,) = torch.autograd.grad(loss(x_pur, torch.arange(3)).sum(), x_pur)
    assert torch.allclose(g_bpda, g_pur)
    assert not torch.allclose(g_bpda, torch.autograd.grad(loss(xb, torch.arange(3)).sum(), xb)[0])


def test_eot_gradient_is_the_mean_of_single_draw_gradients():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 8, 8)
    target = torch.rand(2, 3, 8, 8)
    objective = Objective([Stage("s", quadratic_loss(target))], score=lambda v, idx: torch.ones(len(idx)))
    seeds = [11, 22]
    attack = BPDAEOT(APGD(eps=EPS, steps=1), eot_iter=4)
    xg = x.clone().requires_grad_(True)
    (g_eot,) = torch.autograd.grad(attack.eot_loss(objective, NoisyBlur(), seeds)(xg, torch.arange(2)).sum(), xg)
    grads = []
    for d in range(4):
        gens = generators([derive_seed(s, "eot", 0, d) for s in seeds])
        xs = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(quadratic_loss(target)(bpda(NoisyBlur(), xs, gens), torch.arange(2)).sum(), xs)
        grads.append(g)
    assert torch.allclose(g_eot, torch.stack(grads).mean(0), atol=1e-6)
    assert not torch.allclose(grads[0], grads[1])


def test_bpda_eot_attack_keeps_invariants_and_warns_on_single_draw(caplog):
    x = torch.rand(2, 3, 8, 8)
    objective = Objective([Stage("s", quadratic_loss(torch.rand(2, 3, 8, 8)))], score=lambda v, i: torch.ones(len(i)))
    with caplog.at_level(logging.WARNING):
        x_adv, info = BPDAEOT(APGD(eps=EPS, steps=3), eot_iter=1)(objective, x, NoisyBlur(), [1, 2])
    assert "eot_iter=1" in caplog.text
    assert all(i["ok"] for i in info)
    check_invariants(x_adv, x, EPS)


def test_cache_round_trip_keys_and_atomic_writes(tmp_path, monkeypatch):
    cache = AdversarialCache(tmp_path)
    base = dict(weights={"vlm.model.path": {"model.safetensors": "ab" * 32}}, image="cd" * 32,
                task={"gt_normalisation": "always"}, attack={"eps": 4, "steps": 100}, seed=0, harness_version=1)
    key = cache.key(base)
    assert cache.get(key) is None
    x = torch.rand(3, 8, 8, dtype=torch.float32) / 3
    cache.put(key, x, {"id": "1"})
    got, meta = cache.get(key)
    assert torch.equal(got, x) and got.dtype == torch.float32 and meta == {"id": "1"}
    assert cache.stats() == {"hits": 1, "misses": 1, "writes": 1, "damaged": 0}
    variants = [dict(base, attack={"eps": 2, "steps": 100}), dict(base, seed=1),
                dict(base, weights={"vlm.model.path": {"model.safetensors": "ef" * 32}}), dict(base, image="00" * 32),
                dict(base, task={"gt_normalisation": "never"}), dict(base, subset="12" * 32),
                dict(base, harness_version=2), dict(base, defense={"tau": 0.9})]
    keys = {cache.key(v) for v in variants}
    assert len(keys) == len(variants) and key not in keys
    assert cache.key(dict(base, attack={"eps": 4, "steps": 100, "eval_draws": 10})) == key
    with pytest.raises(ValueError, match="weights"):
        cache.key({k: v for k, v in base.items() if k != "weights"})

    import attacks.cache as cache_module

    def broken_save(tensors, path):
        with open(path, "wb") as f:
            f.write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(cache_module, "save_file", broken_save)
    other = cache.key(dict(base, seed=7))
    with pytest.raises(KeyboardInterrupt):
        cache.put(other, x, {})
    assert cache.get(other) is None
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".tmp-")]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "wrong_shape", "nan", "bad_meta"])
def test_cache_damaged_entry_is_a_miss_with_a_warning(tmp_path, caplog, damage):
    from safetensors.torch import save_file

    cache = AdversarialCache(tmp_path)
    key = cache.key(dict(weights={}, image="x", task={}, attack={}, seed=0, harness_version=1))
    x = torch.rand(3, 8, 8)
    cache.put(key, x, {"id": "1"})
    path = cache._path(key)
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:40])
    elif damage == "garbage":
        path.write_bytes(b"\x00" * 100)
    elif damage == "wrong_shape":
        save_file({"x_adv": torch.rand(3, 4, 4)}, str(path))
    elif damage == "nan":
        save_file({"x_adv": torch.full((3, 8, 8), float("nan"))}, str(path))
    else:
        path.with_suffix(".json").write_text("{not json")
    with caplog.at_level(logging.WARNING):
        assert cache.get(key, like=x) is None
    assert str(path) in caplog.text and cache.stats()["damaged"] == 1
