"""Adversarial images for one batch: from the cache where possible, else by running the configured attack.

Every image that comes back, cached or fresh, is checked against its eps-ball and the [0, 1] box; a
violation writes the offending rows to ``invariant_violations.jsonl`` in the run folder and stops the run.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import OmegaConf

from attacks.base import check_invariants, enforce_invariants
from evaluators.datasets.manifests import draw
from evaluators.fingerprints import fingerprint_run
from evaluators.run_folder import without_places
from evaluators.seeding import derive_seed
from evaluators.tasks.base import Task

if TYPE_CHECKING:
    from evaluators.runner import Harness



def key_material(h: Harness, name: str, task: Task, adaptive: bool) -> dict[str, Any]:
    """What an adversarial image depends on besides its pixels (see attacks/cache.py); no paths, so a moved
    checkpoint or data set still hits, and changed weights miss. ``AdversarialCache.key`` drops the keys that
    only change how images are judged (``attack.eval_draws``, ``attack.from_cache``)."""
    # a Harness built outside build() (scripts) has none yet: fingerprint the weights now (cached, so cheap)
    weights = (h.fingerprints or fingerprint_run(h.cfg, []))["weights"]
    task_cfg = OmegaConf.to_container(h.cfg.dataset.tasks[name], resolve=True)
    material: dict[str, Any] = {
        "weights": {k: v for k, v in weights.items() if k.startswith("vlm")},
        "vlm": without_places(OmegaConf.to_container(h.cfg.vlm, resolve=True)),
        "task": without_places(task_cfg),
        "attack": OmegaConf.to_container(h.cfg.attack, resolve=True),
        "seed": int(h.cfg.seed.noise), "harness_version": int(h.cfg.harness_version),
    }
    if type(task).prepare is not Task.prepare:  # the metric depends on the evaluated subset (CIDEr's idf)
        ids = h.subsets.get(name) or draw(task.source, name, h.cfg.n_samples, int(h.cfg.seed.subset))["ids"]
        material["subset"] = hashlib.sha256("\x1f".join(ids).encode()).hexdigest()
    if adaptive:
        defense = OmegaConf.to_container(h.cfg.defense, resolve=True)
        defense.pop("eval_draws", None)
        material["defense"] = {"config": without_places(defense), "weights": weights}
    return material


def pixels_hash(x: torch.Tensor) -> str:
    t = x.detach().float().cpu().contiguous()
    return hashlib.sha256(str(tuple(t.shape)).encode() + t.numpy().tobytes()).hexdigest()


def adversarial_images(h: Harness, name: str, task: Task, samples: list[dict],
                       x: torch.Tensor) -> tuple[torch.Tensor, list[dict]]:
    """Adversarial images for a batch and one info dict per sample (attack info, cache hit/miss, L-inf)."""
    acfg, attack, cache = h.cfg.attack, h.attack, h.cache
    material = key_material(h, name, task, attack.adaptive)  # the one place keys are built
    keys = [cache.key({**material, "image": pixels_hash(x[j])}) for j in range(len(samples))]
    read = bool(acfg.get("from_cache", True))
    cached = [cache.get(k, like=x[j]) if read else None for j, k in enumerate(keys)]
    miss = [j for j, c in enumerate(cached) if c is None]
    x_adv = x.clone()
    info: list[dict] = [{} for _ in samples]
    for j, c in enumerate(cached):
        if c is not None:
            x_adv[j] = c[0].to(x)
            info[j] = {**c[1].get("info", {}), "cache": "hit"}
    eps = float(acfg.eps) / 255.0
    rows = check_invariants(x_adv, x, eps)  # cached images are checked like fresh ones
    _stop_on_violation(rows, eps, samples, h.run_dir, name)
    if miss:
        sub = [samples[j] for j in miss]
        protocol = acfg.get("zero_shot")
        objective = task.objective(h.vlm, sub, acfg.schedule, x_clean=x[miss].detach(),
                                   protocol=None if protocol is None else OmegaConf.to_container(protocol))
        seeds = [derive_seed(h.cfg.seed.noise, name, s["id"], "attack") for s in sub]
        x_new, new_info = attack(objective, x[miss].detach(), seeds, h.defense if attack.adaptive else None)
        for k, j in enumerate(miss):
            x_adv[j] = x_new[k].to(x)
            row = _jsonable(new_info[k])
            cache.put(keys[j], x_new[k].detach().float().cpu().contiguous(),
                      {"id": samples[j]["id"], "attack": acfg.name, "eps": acfg.eps, "info": row})
            info[j] = {**row, "cache": "miss"}
            rows[j] = {f: row[f] for f in ("linf_255", "min", "max", "ok")}  # checked by the attack
    for j, r in enumerate(rows):
        info[j].update({"linf_255": r["linf_255"], "in_box": r["min"] >= 0 and r["max"] <= 1,
                        "invariants_ok": r["ok"]})
    return x_adv, info


def _stop_on_violation(rows: list[dict], eps: float, samples: list[dict], run_dir: Path, task: str) -> None:
    if all(r["ok"] for r in rows):
        return
    path = Path(run_dir) / "invariant_violations.jsonl"
    with path.open("a") as f:
        for r, s in zip(rows, samples, strict=True):
            if not r["ok"]:
                f.write(json.dumps({"task": task, "id": s["id"], **r}) + "\n")
    enforce_invariants(rows, eps, [s["id"] for s in samples])


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)
