"""``summary.json`` from ``samples.jsonl`` alone, so a finished run can be re-scored without its data set."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import logging
import platform
import subprocess
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from evaluators import results
from evaluators.tasks.base import Task

log = logging.getLogger(__name__)

CONDITIONS = ("clean", "clean_defended", "clean_defended_worst", "adv", "adv_defended", "adv_defended_worst")
PACKAGES = ("torch", "torchvision", "transformers", "hydra-core", "open-clip-torch", "open-flamingo",
            "torchattacks", "pycocoevalcap", "numpy", "safetensors")


def sample_view(record: dict) -> dict:
    """The annotation dict a task's ``aggregate`` reads, rebuilt from a record."""
    return {"id": record["id"], **(record.get("inputs") or {}), **(record.get("references") or {})}


def task_metrics(task: Task, records: list[dict]) -> dict[str, dict[str, float]]:
    """metric -> condition -> value. Defended conditions: the mean over purification draws of the corpus metric,
    and ``*_worst``: the corpus metric when each sample keeps its worst draw (lowest primary metric)."""
    samples = {r["id"]: sample_view(r) for r in records}
    out: dict[str, dict[str, float]] = defaultdict(dict)
    conds = [c for c in ("clean", "clean_defended", "adv", "adv_defended") if c in records[0]["predictions"]]
    for cond in conds:
        if not cond.endswith("_defended"):
            values = task.aggregate({r["id"]: r["predictions"][cond] for r in records}, samples)
            for m, v in values.items():
                out[m][cond] = float(v)
            continue
        n_draws = len(records[0]["predictions"][cond])
        per_draw = [task.aggregate({r["id"]: r["predictions"][cond][d] for r in records}, samples)
                    for d in range(n_draws)]
        for m in per_draw[0]:
            out[m][cond] = float(np.mean([pd[m] for pd in per_draw]))
        worst = {}
        for r in records:
            scores = [m[task.primary] for m in r["metrics"][cond]]
            worst[r["id"]] = r["predictions"][cond][int(np.argmin(scores))]
        for m, v in task.aggregate(worst, samples).items():
            out[m][f"{cond}_worst"] = float(v)
    return dict(out)


def defense_stats(records: list[dict]) -> dict[str, dict[str, float]]:
    """Per condition: stopping-time distribution, evaluations and convergence of the purifier."""
    out = {}
    for cond in ("clean_defended", "adv_defended"):
        infos = [i for r in records for i in r.get("defense", {}).get(cond, [])]
        if not infos:
            continue
        t = np.array([i["t"] for i in infos])
        out[cond] = {
            "t_mean": float(t.mean()), "t_median": float(np.median(t)),
            "t_p10": float(np.quantile(t, 0.1)), "t_p90": float(np.quantile(t, 0.9)),
            "steps_mean": float(np.mean([i["steps"] for i in infos])),
            "denoiser_evals_mean": float(np.mean([i["denoiser_evals"] for i in infos])),
            "encoder_evals_mean": float(np.mean([i["encoder_evals"] for i in infos])),
            "converged_fraction": float(np.mean([bool(i["converged"]) for i in infos])),
            "seconds_per_image": float(np.mean([i["seconds"] for i in infos])),
        }
    return out


def attack_stats(records: list[dict]) -> dict[str, Any]:
    rows = [r["attack"] for r in records if "attack" in r]
    if not rows:
        return {}
    return {
        "max_linf_255": float(max(a["linf_255"] for a in rows)),
        "all_invariants_ok": all(a["invariants_ok"] for a in rows),
        "cache_hits": sum(a.get("cache") == "hit" for a in rows),
        "cache_misses": sum(a.get("cache") == "miss" for a in rows),
        **verdict_stats(rows),
    }


def verdict_stats(rows: list[dict]) -> dict[str, Any]:
    """DiffPure's verdict of BPDA+EOT (any judged iterate broke the image): robust accuracy x100."""
    judged = [a["broken"] for a in rows if a.get("broken") is not None]
    return {"verdict_any_iterate_robust": 100.0 * (1 - float(np.mean(judged)))} if judged else {}


def summarise(run_dir: Path, cfg: DictConfig, tasks: dict[str, Task], extra: dict | None = None) -> dict:
    records = results.read_records(run_dir / results.SAMPLES)
    by_task: dict[str, list[dict]] = defaultdict(list)
    errors: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        (by_task if r.get("status") == "ok" else errors)[r["task"]].append(r)
    metrics, timing, defense, attack, counts = {}, {}, {}, {}, {}
    for name, task in tasks.items():
        recs = sorted(by_task.get(name, []), key=lambda r: r["id"])
        counts[name] = {"evaluated": len(recs), "errors": len(errors.get(name, [])),
                        "error_ids": [r["id"] for r in errors.get(name, [])]}
        if not recs:
            continue
        metrics[name] = task_metrics(task, recs)
        stages = sorted({k for r in recs for k in r["seconds"]})
        timing[name] = {s: float(sum(r["seconds"].get(s, 0.0) for r in recs)) for s in stages}
        defense[name] = defense_stats(recs)
        attack[name] = attack_stats(recs)
    present = {c for m in metrics.values() for by in m.values() for c in by}
    return {
        "metrics": metrics,
        "conditions": [c for c in CONDITIONS if c in present],
        "samples": counts,
        "timing_seconds": timing,
        "defense": defense,
        "attack": attack,
        "seeds": OmegaConf.to_container(cfg.seed, resolve=True),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "environment": environment(),
        **(extra or {}),
    }


def write_summary(run_dir: Path, summary: dict) -> None:
    results.write_json_atomic(run_dir / results.SUMMARY, summary)


def environment() -> dict:
    versions = {}
    for p in PACKAGES:
        try:
            versions[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            versions[p] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                    text=True, cwd=Path(__file__).parent, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return {
        "git_commit": commit, "git_dirty": dirty, "packages": versions, "python": platform.python_version(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({platform.processor()})",
        "torch_threads": torch.get_num_threads(), "finished": dt.datetime.now(dt.timezone.utc).isoformat(),
    }
