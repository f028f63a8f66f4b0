"""The Attack call shape and invariants, the schedule runner (keep-worst, early stop, starts, restarts,
precision, per-image targets), BPDA+EOT (gradients, fresh noise, memory, verdict), config checks and cache keys."""

from __future__ import annotations

import gc
import logging
import weakref

import pytest
import torch

from attacks.apgd import APGD
from attacks.base import Attack, InvariantError, Objective, Stage, check_invariants, enforce_invariants
from attacks.bpda_eot import BPDAEOT
from attacks.schedule import ScheduleAttack
from diffcap.base import Purifier, PurifyInfo
from diffcap.purifiers import bpda
from evaluators.seeding import derive_seed, generators

EPS = 4 / 255


def test_invariant_rows_are_measured_and_a_violation_stops_the_attack():
    x = torch.rand(3, 3, 4, 4) * 0.5 + 0.25
    bad = x.clone()
    bad[1] += 5 / 255
    bad[2, 0, 0, 0] = 1.2
    rows = check_invariants(bad, x, EPS)
    assert [r["ok"] for r in rows] == [True, False, False]
    assert rows[1]["linf_255"] == pytest.approx(5, abs=1e-4) and rows[2]["max"] == pytest.approx(1.2)
    with pytest.raises(InvariantError, match="2 adversarial image"):
        enforce_invariants(rows, EPS, ["a", "b", "c"])

    class Overshoot(Attack):  # a broken attack: one image leaves the ball
        eps = EPS

        def run(self, objective, x, seeds, defense):
            out = x.clone()
            out[0] = (out[0] + 2 * EPS).clamp(0, 1)
            return out, [{} for _ in seeds]

    objective = Objective([Stage("s", lambda v, i: v.flatten(1).sum(1))], score=lambda v, i: torch.ones(len(i)))
    with pytest.raises(InvariantError, match="violate the threat model"):
        Overshoot()(objective, x, [0, 1, 2])
    with pytest.raises(ValueError, match="2 seeds for 3 images"):
        Overshoot()(objective, x, [0, 1])


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

    def score(v, idx):  # lower = better attack; samples 0-2 are "broken" by stage a
        s = -(v - x[idx]).mul(direction[idx]).flatten(1).sum(1)
        s[idx == 3] = 5.0  # sample 3 cannot be broken
        return s

    objective = Objective(stages=[Stage("a", loss_a), Stage("b", loss_b, start="best")], score=score,
                          success_below=-0.05)
    x_adv, info = ScheduleAttack(APGD(eps=EPS, steps=3, initial_step=1.0))(objective, x, [0, 1, 2, 3])
    assert [i["kept_stage"] for i in info[:3]] == ["a", "a", "a"]
    assert info[3]["kept_stage"] == "clean" and info[3]["score_final"] == 5.0
    assert all(i == [3] for i in calls["b"])  # only the unbroken sample ran stage b
    assert [i["runs"] for i in info] == [1, 1, 1, 2]
    assert all(i["ok"] for i in info)
    # the kept image is the one that scored best: samples 0-2 moved along +direction
    assert (score(x_adv[:3], torch.arange(3)) <= -0.05).all()


def test_samples_already_broken_on_clean_images_are_not_attacked():
    x = torch.rand(2, 3, 4, 4)
    n_calls = []

    def loss(v, idx):
        n_calls.append(1)
        return v.flatten(1).sum(1)

    objective = Objective([Stage("s", loss)], score=lambda v, idx: torch.zeros(len(idx)), success_below=0.0)
    x_adv, info = ScheduleAttack(APGD(eps=EPS, steps=2))(objective, x, [0, 1])
    assert not n_calls and torch.equal(x_adv, x) and info[0]["runs"] == 0


def recording_stage(name: str, seen: list, **kw) -> Stage:
    def loss(v, idx):
        on = torch.is_autocast_enabled("cpu")
        seen.append((name, v.detach().clone(), idx.tolist(),
                     str(torch.get_autocast_dtype("cpu")).replace("torch.", "") if on else "float32"))
        return (v * torch.linspace(-1, 1, v[0].numel()).view(v[0].shape)).flatten(1).sum(1)

    return Stage(name, loss, **kw)


def test_random_start_and_restarts_are_effective_in_every_stage():
    x = torch.full((2, 3, 4, 4), 0.5)
    seen: list = []
    objective = Objective([recording_stage("ce", seen, restarts=3), recording_stage("t", seen)],
                          score=lambda v, i: torch.ones(len(i)), success_below=0.0)
    ScheduleAttack(APGD(eps=EPS, steps=1, random_start=True))(objective, x, [5, 6])
    starts = [v for name, v, _, _ in seen[0::2]]  # each run: start, then one iterate
    assert [name for name, *_ in seen[0::2]] == ["ce", "ce", "ce", "t"]
    for s in starts:
        assert not torch.equal(s, x)
        assert torch.allclose((s - x).flatten(1).abs().amax(1), torch.full((2,), EPS), atol=1e-7)
    assert len({tuple(s.flatten().tolist()) for s in starts}) == 4  # each run its own random start
    assert not torch.equal(starts[0][0], starts[0][1])  # and each sample its own
    # the same seeds give the same starts, whatever the batch
    seen_b: list = []
    objective_b = Objective([recording_stage("ce", seen_b)], score=lambda v, i: torch.ones(len(i)))
    ScheduleAttack(APGD(eps=EPS, steps=1, random_start=True))(objective_b, x[1:], [6])
    assert torch.equal(seen_b[0][1][0], starts[0][1])
    # a stage may switch it off, and a stage that starts from the best image does not draw one
    seen.clear()
    objective = Objective([recording_stage("a", seen, random_start=False), recording_stage("b", seen, start="best")],
                          score=lambda v, i: torch.ones(len(i)))
    ScheduleAttack(APGD(eps=EPS, steps=1, random_start=True))(objective, x, [5, 6])
    assert torch.equal(seen[0][1], x) and torch.equal(seen[2][1], x)  # nothing improved: best is clean


def test_restarts_run_only_on_samples_not_yet_broken():
    x = torch.full((3, 3, 4, 4), 0.5)
    seen: list = []
    broken = {1}

    def score(v, idx):
        return torch.tensor([0.0 if int(i) in broken else 1.0 for i in idx])

    objective = Objective([recording_stage("ce", seen, restarts=2)], score=score, success_below=0.0)
    _, info = ScheduleAttack(APGD(eps=EPS, steps=1))(objective, x, [0, 1, 2])
    assert [idx for _, _, idx, _ in seen] == [[0, 2]] * 4
    assert [i["runs"] for i in info] == [2, 0, 2]


@pytest.mark.parametrize("default", ["float32", "bfloat16"])
def test_stage_precision_is_honoured(default):
    x = torch.full((1, 3, 4, 4), 0.5)
    seen: list = []
    objective = Objective([recording_stage("half", seen, dtype="bfloat16"), recording_stage("full", seen,
                          dtype="float32"), recording_stage("default", seen)], score=lambda v, i: torch.ones(1))
    ScheduleAttack(APGD(eps=EPS, steps=1, dtype=default))(objective, x, [0])
    used = {name: dt for name, _, _, dt in seen}
    assert used == {"half": "bfloat16", "full": "float32", "default": default}


def test_final_stage_attacks_each_images_best_target():
    """RobustVLM's fp32 stage: per image, the target of the stage that did best (stage target, not index 0)."""
    x = torch.full((3, 3, 4, 4), 0.5)
    w = torch.randn(3, 3, 3, 4, 4, generator=torch.Generator().manual_seed(0))  # target k, sample i: w[k, i]
    chosen: list = []

    def target_loss(ks):
        def loss(v, idx):
            return torch.stack([(v[j] * w[ks[int(i)], int(i)]).sum() for j, i in enumerate(idx)])
        return loss

    def follow(best):
        chosen.append(list(best))
        return target_loss([0 if k is None else k for k in best])

    good = {0: 2, 1: 1}  # sample 0 is hurt most by target 2, sample 1 by target 1, sample 2 by none

    def score(v, idx):
        out = []
        for j, i in enumerate(idx.tolist()):
            k = good.get(i)
            out.append(5.0 if k is None else -float((v[j] - x[i]).mul(w[k, i]).sum()))
        return torch.tensor(out)

    stages = [Stage(f"t{k}", target_loss([k] * 3), target=k) for k in range(3)]
    stages.append(Stage("best-fp32", follow_best=follow, dtype="float32", start="best"))
    _, info = ScheduleAttack(APGD(eps=EPS, steps=2))(Objective(stages, score=score), x, [0, 1, 2])
    assert chosen == [[2, 1, None]]
    assert [i["kept_stage"] for i in info[:2]] in (["t2", "t1"], ["best-fp32", "t1"], ["t2", "best-fp32"],
                                                   ["best-fp32", "best-fp32"])


# ------------------------------------------------------------------------------------------------ BPDA+EOT


class Blur(Purifier):
    """Deterministic stand-in purifier."""

    def purify(self, x, generators):
        y = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
        return y, [PurifyInfo() for _ in range(x.shape[0])]


class NoisyBlur(Blur):
    randomized = True

    def __init__(self):
        super().__init__()
        self.first_draws: list = []

    def purify(self, x, generators):
        y, info = super().purify(x, generators)
        noise = torch.stack([torch.randn(x.shape[1:], generator=g) for g in generators])
        self.first_draws.append(float(noise.flatten()[0]))
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


def test_eot_is_the_mean_of_single_draw_gradients_with_fresh_noise_every_step():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 8, 8)
    target = torch.rand(2, 3, 8, 8)
    seeds = [11, 22]
    purifier = NoisyBlur()
    eot = BPDAEOT(APGD(eps=EPS, steps=1), eot_iter=4).eot_loss(quadratic_loss(target), purifier, seeds)
    value, g_eot = eot(x, torch.arange(2))
    grads, values = [], []
    for d in range(4):
        gens = generators([derive_seed(s, "eot", 0, d) for s in seeds])
        xs = x.clone().requires_grad_(True)
        v = quadratic_loss(target)(bpda(NoisyBlur(), xs, gens), torch.arange(2))
        (g,) = torch.autograd.grad(v.sum(), xs)
        grads.append(g)
        values.append(v.detach())
    assert torch.allclose(g_eot, torch.stack(grads).mean(0), atol=1e-6)
    assert torch.allclose(value, torch.stack(values).mean(0), atol=1e-6)
    assert not torch.allclose(grads[0], grads[1])
    # the next step (same image) draws other noise
    value2, g2 = eot(x, torch.arange(2))
    assert not torch.allclose(g2, g_eot)
    assert len(set(purifier.first_draws)) == 8


def test_eot_frees_each_draws_graph_before_the_next():
    alive: list = []

    def loss(v, idx):
        assert all(r() is None for r in alive), "an earlier draw's graph is still alive"
        out = (v**2).flatten(1).sum(1)
        alive.append(weakref.ref(out))
        return out

    eot = BPDAEOT(APGD(eps=EPS, steps=1), eot_iter=3).eot_loss(loss, NoisyBlur(), [1])
    gc.collect()
    value, grad = eot(torch.rand(1, 3, 4, 4), torch.arange(1))
    assert len(alive) == 3 and not value.requires_grad


def test_bpda_eot_moves_the_image_and_warns_on_single_draw(caplog):
    x = torch.rand(2, 3, 8, 8) * 0.5 + 0.25
    target = torch.rand(2, 3, 8, 8)
    loss = quadratic_loss(target)
    objective = Objective([Stage("s", loss)], score=lambda v, i: torch.ones(len(i)), success_below=0.0)
    with caplog.at_level(logging.WARNING):
        x_adv, info = BPDAEOT(APGD(eps=EPS, steps=5), eot_iter=1)(objective, x, [1, 2], NoisyBlur())
    assert "eot_iter=1" in caplog.text
    d = (x_adv - x).flatten(1).abs().amax(1)
    assert (d > 0.9 * EPS).all() and all(i["ok"] for i in info)
    with torch.no_grad():  # the attack raised the defended loss
        assert (loss(Blur().purify(x_adv, None)[0], torch.arange(2)) > loss(Blur().purify(x, None)[0],
                                                                              torch.arange(2))).all()
    assert [i["broken"] for i in info] == [False, False]


def test_verdict_judges_every_iterate_with_fresh_draws_and_any_break_counts():
    x = torch.rand(2, 3, 8, 8) * 0.5 + 0.25

    def loss(v, idx):
        return (v * torch.linspace(-1, 1, v[0].numel()).view(v[0].shape)).flatten(1).sum(1)

    judged: list = []

    def judge(draws, idx):
        judged.append([d.clone() for d in draws])
        k = len(judged) - 1  # the k-th judged iterate (k = 0 is the start)
        return torch.tensor([0.0 if (k == 2 and int(i) == 0) else 1.0 for i in idx])

    purifier = NoisyBlur()
    objective = Objective([Stage("s", loss)], score=lambda v, i: torch.ones(len(i)), success_below=0.0, judge=judge)
    seen: list = []
    attack = BPDAEOT(APGD(eps=EPS, steps=4, initial_step=0.25), eot_iter=1, verdict="any_iterate", verdict_draws=3)
    orig = attack.apgd.variant

    def spy(**kw):
        a = orig(**kw)
        run = a.perturb

        def perturb(*args, observe=None, **kwargs):
            def obs(k, xk, index):
                seen.append(xk.clone())
                observe(k, xk, index)
            return run(*args, observe=obs, **kwargs)
        a.perturb = perturb
        return a

    attack.apgd.variant = spy
    x_adv, info = attack(objective, x, [1, 2], purifier)
    assert len(judged) == 5 and all(len(d) == 3 for d in judged)
    assert [i["broken"] for i in info] == [True, False] and info[0]["broken_at"] == 2
    assert torch.equal(x_adv[0], seen[2][0])  # the breaking iterate is returned
    # fresh noise for every purification: verdict draws of every iterate and the EOT draws
    assert len(purifier.first_draws) == 5 * 3 + 5 and len(set(purifier.first_draws)) == len(purifier.first_draws)
    # the final-iterate verdict judges nothing during the attack
    judged.clear()
    x_fin, info_fin = BPDAEOT(APGD(eps=EPS, steps=4, initial_step=0.25), eot_iter=1, verdict="final")(
        objective, x, [1, 2], purifier)
    assert not judged and info_fin[0]["broken"] is None and not torch.equal(x_fin[0], x_adv[0])


def test_default_verdict_averages_the_score_over_draws():
    objective = Objective([Stage("s", lambda v, i: v.sum())], score=lambda v, i: v.flatten(1).mean(1))
    draws = [torch.full((2, 1, 2, 2), 0.2), torch.full((2, 1, 2, 2), 0.6)]
    assert torch.allclose(objective.verdict(draws, torch.arange(2)), torch.tensor([0.4, 0.4]))


def test_bpda_eot_refuses_more_than_one_stage():
    objective = Objective([Stage("a", lambda v, i: v.flatten(1).sum(1)), Stage("b", lambda v, i: v.flatten(1).sum(1))],
                          score=lambda v, i: torch.ones(len(i)), success_below=0.0)
    with pytest.raises(ValueError, match="runs one APGD stage"):
        BPDAEOT(APGD(eps=EPS, steps=1), eot_iter=1)(objective, torch.rand(1, 3, 4, 4), [0], Blur())
