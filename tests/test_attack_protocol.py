"""RobustVLM's zero-shot protocol, the attack config checks, cache keys, and the cache orchestration."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from attacks.base import InvariantError, Objective, Stage
from attacks.cache import AdversarialCache
from attacks.orchestrate import adversarial_images, key_material, pixels_hash
from evaluators.config import compose_config, validate
from evaluators.errors import ConfigError
from evaluators.tasks.base import Task
from evaluators.tasks.classification import ClassificationTask


class Classes:
    """A classification source with ``n`` classes (only what ``objective`` reads)."""

    def __init__(self, n: int):
        self.classnames = [f"c{i}" for i in range(n)]
        self.templates = ["a photo of a {}."]
        self.ids = ["0"]


def stages(n_classes: int, protocol=None) -> list[Stage]:
    task = ClassificationTask(Classes(n_classes))
    return task.objective(None, [{"label": 0}], "single", protocol=protocol).stages


def test_zero_shot_default_is_robustvlms_autoattack_custom():
    got = stages(20)
    assert [s.name for s in got] == ["ce"] + [f"dlr-target-{k}" for k in range(2, 11)]
    ce, targets = got[0], got[1:]
    assert (ce.restarts, ce.random_start, ce.initial_step, ce.targeted) == (5, True, 2.0, False)
    assert all((t.restarts, t.random_start, t.initial_step, t.targeted) == (1, True, 2.0, True) for t in targets)
    assert [t.target for t in targets] == list(range(1, 10))  # the 2nd..10th ranked classes
    assert [s.name for s in stages(5)] == ["ce"] + [f"dlr-target-{k}" for k in range(2, 6)]  # min(9, C - 1)
    assert [s.name for s in stages(2)] == ["ce"]  # only APGD-CE with <= 2 classes
    small = stages(20, {"ce_restarts": 1, "target_classes": 3, "random_start": None, "initial_step": None})
    assert [s.name for s in small] == ["ce", "dlr-target-2", "dlr-target-3", "dlr-target-4"]
    assert small[0].restarts == 1 and small[0].random_start is None and small[0].initial_step is None
    assert [s.name for s in stages(20, {"attacks": ["apgd-ce"]})] == ["ce"]


def test_configs_carry_the_protocols():
    cfg = compose_config(["attack=apgd"])
    assert OmegaConf.to_container(cfg.attack.zero_shot) == {"attacks": ["apgd-ce", "apgd-t"], "ce_restarts": 5,
                                                             "target_classes": 9, "initial_step": 2.0,
                                                             "random_start": True}
    assert cfg.attack.steps == 100 and cfg.attack.method.apgd.step_weight == 0.75
    assert cfg.attack.method.apgd.initial_step == 1.0 and not cfg.attack.method.apgd.random_start  # RobustVLM VQA
    bpda = compose_config(["attack=bpda_eot", "defense=diffpure"])
    assert bpda.attack.method.verdict == "any_iterate"


@pytest.mark.parametrize("overrides, message", [
    (["attack=bpda_eot", "attack.schedule=ensemble"], "attack.schedule=ensemble is not supported"),
    (["attack=bpda_eot", "attack.zero_shot.ce_restarts=5"], "attack.zero_shot.ce_restarts=1"),
    (["attack=bpda_eot", "attack.verdict=sometimes"], "attack.verdict must be"),
    (["attack=bpda_eot", "attack.verdict_draws=0"], "attack.verdict_draws must be >= 1"),
    (["attack=apgd", "attack.schedule=twice"], "attack.schedule must be one of"),
    (["attack=apgd", "attack.zero_shot.attacks=[fab]"], "attack.zero_shot.attacks must be"),
])
def test_attack_config_errors_are_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message) as e:
        validate(compose_config([*overrides, "defense=diffpure"]))
    assert "\n" not in str(e.value)


class FixedTask:
    prepare = Task.prepare  # no subset in the key

    def __init__(self, stage_loss=None):
        self.loss = stage_loss

    def objective(self, vlm, batch, schedule, x_clean=None, protocol=None):
        return Objective([Stage("s", self.loss)], score=lambda v, i: -self.loss(v, i))


def harness(overrides, tmp_path=None, attack=None, cache=None):
    cfg = compose_config(overrides)
    return SimpleNamespace(cfg=cfg, fingerprints={"weights": {"vlm": {"model.safetensors": "abc"}}}, subsets={},
                           attack=attack, cache=cache, defense=None, vlm=None, run_dir=tmp_path)


def test_cache_key_material():
    def k(overrides, adaptive=True, task="classification", kind="bpda_eot"):
        material = key_material(harness([f"attack={kind}", "defense=diffpure", *overrides]), task, FixedTask(),
                                adaptive)
        return AdversarialCache.key({**material, "image": "x"})

    key = k([])
    # the verdict draws of the run's evaluation do not change the images; everything else does
    assert k(["attack.eval_draws=3"]) == key and k(["attack.from_cache=false"]) == key
    assert k(["defense.eval_draws=3"]) == key
    changed = [k(["attack.verdict_draws=3"]), k(["attack.verdict=final"]), k(["attack.steps=7"]),
               k(["attack.eot_iter=2"]), k(["seed.noise=1"]), k(["defense.t_star=0.2"]), k([], task="vqa"),
               k(["harness_version=2"]), k(["attack.eps=2"])]
    assert len(set(changed)) == len(changed) and key not in changed
    # grey-box images are shared across defenses; the zero-shot protocol is part of the key
    grey = k([], adaptive=False, kind="apgd")
    assert k(["defense=diffcap"], adaptive=False, kind="apgd") == grey
    assert k(["attack.zero_shot.ce_restarts=2"], adaptive=False, kind="apgd") != grey


def test_orchestration_caches_and_stops_on_a_corrupted_cached_image(tmp_path):
    cfg = compose_config(["attack=apgd", "attack.steps=2"])
    h = harness(["attack=apgd", "attack.steps=2"], tmp_path, instantiate(cfg.attack.method),
                AdversarialCache(tmp_path / "cache"))
    x = torch.rand(2, 3, 8, 8) * 0.5 + 0.25
    samples = [{"id": "a"}, {"id": "b"}]
    task = FixedTask(lambda v, i: v.flatten(1).sum(1))
    x_adv, info = adversarial_images(h, "classification", task, samples, x)
    assert [i["cache"] for i in info] == ["miss", "miss"] and all(i["invariants_ok"] for i in info)
    assert not torch.equal(x_adv, x)
    x_again, info = adversarial_images(h, "classification", task, samples, x)
    assert [i["cache"] for i in info] == ["hit", "hit"] and torch.equal(x_again, x_adv)
    # a cached image outside the ball (e.g. a file from another eps) stops the run and is reported
    key = h.cache.key({**key_material(h, "classification", task, False), "image": pixels_hash(x[1])})
    h.cache.put(key, (x[1] + 0.2).clamp(0, 1), {"info": {}})
    with pytest.raises(InvariantError, match="samples: b"):
        adversarial_images(h, "classification", task, samples, x)
    rows = [json.loads(line) for line in (tmp_path / "invariant_violations.jsonl").read_text().splitlines()]
    assert [(r["id"], r["ok"]) for r in rows] == [("b", False)] and rows[0]["linf_255"] > 4


def test_classification_verdict_averages_logits_over_draws():
    """DiffPure's verdict: logits averaged over the draws, then top-1 (not the mean of per-draw top-1)."""
    task = ClassificationTask(Classes(2))
    task.logits = lambda vlm, x: torch.stack([x.flatten(1)[:, 0], x.flatten(1)[:, 1]], 1)  # logits = 2 pixels
    objective = task.objective(None, [{"label": 0}], "single")
    a = torch.tensor([2.0, 0.0, 0.0, 0.0]).view(1, 1, 2, 2)  # class 0 (correct) by 2
    b = torch.tensor([0.0, 1.0, 0.0, 0.0]).view(1, 1, 2, 2)  # class 1 by 1
    assert objective.verdict([a, b], torch.arange(1)).tolist() == [1.0]  # mean logits [1, 0.5]: correct
    assert objective.verdict([b, b, b, a], torch.arange(1)).tolist() == [0.0]  # mean logits [0.5, 0.75]
