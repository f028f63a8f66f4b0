"""Adversarial images for one batch: from the cache where possible, else by running the configured attack.

Every image that comes back, cached or fresh, is checked against its eps-ball and the [0, 1] box; a
violation writes the offending rows to ``invariant_violations.jsonl`` in the run folder and stops the run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from attacks.base import Attack, check_invariants, enforce_invariants
from attacks.cache import AdversarialCache
from diffcap.base import Purifier
from evaluators.seeding import derive_seed

#: attack config keys that do not change the adversarial images (verdict draws of the run's evaluation)
KEY_FREE = ("from_cache", "eval_draws")


def key_material(cfg: DictConfig, task: str, sample_id: str, adaptive: bool) -> dict[str, Any]:
    """Everything that determines one sample's adversarial image; hashed by ``AdversarialCache.key``."""
    attack = OmegaConf.to_container(cfg.attack, resolve=True)
    for k in KEY_FREE:
        attack.pop(k, None)
    defense = None
    if adaptive:
        defense = OmegaConf.to_container(cfg.defense, resolve=True)
        defense.pop("eval_draws", None)
    return {"vlm": OmegaConf.to_container(cfg.vlm, resolve=True), "sample": f"{cfg.dataset.name}/{task}/{sample_id}",
            "attack": attack, "seed": int(cfg.seed.noise), "version": int(cfg.harness_version), "defense": defense}


def adversarial_images(cfg: DictConfig, attack: Attack, cache: AdversarialCache, defense: Purifier | None,
                       vlm: Any, task_name: str, task: Any, samples: list[dict], x: torch.Tensor,
                       run_dir: Path) -> tuple[torch.Tensor, list[dict]]:
    """Adversarial images for a batch and one info dict per sample (attack info, cache hit/miss, L-inf)."""
    acfg = cfg.attack
    keys = [cache.key(key_material(cfg, task_name, s["id"], attack.adaptive)) for s in samples]
    read = bool(acfg.get("from_cache", True))
    cached = [cache.get(k) if read else None for k in keys]
    miss = [j for j, c in enumerate(cached) if c is None]
    x_adv = x.clone()
    info: list[dict] = [{} for _ in samples]
    for j, c in enumerate(cached):
        if c is not None:
            x_adv[j] = c[0].to(x)
            info[j] = {**c[1].get("info", {}), "cache": "hit"}
    eps = float(acfg.eps) / 255.0
    rows = check_invariants(x_adv, x, eps)  # cached images are checked like fresh ones
    _stop_on_violation(rows, eps, samples, run_dir, task_name)
    if miss:
        sub = [samples[j] for j in miss]
        protocol = acfg.get("zero_shot")
        objective = task.objective(vlm, sub, acfg.schedule, x_clean=x[miss].detach(),
                                   protocol=None if protocol is None else OmegaConf.to_container(protocol))
        seeds = [derive_seed(cfg.seed.noise, task_name, s["id"], "attack") for s in sub]
        x_new, new_info = attack(objective, x[miss].detach(), seeds, defense if attack.adaptive else None)
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
