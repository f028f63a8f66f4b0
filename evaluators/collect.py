"""Finished runs as table entries: one ``Entry`` per (run, task, attack strength) with the per-sample values
of its primary metric, read back from ``samples.jsonl`` and checked against ``summary.json``.

Facets name what a run varies (``defense``, ``strength``, ``dataset``, ``vlm``, ``tau``, ``step``, ...);
the table and figure scripts pivot on them. Every attacked run also holds the clean conditions, so the
``clean`` strength comes from any run of the same model, data and defense (they must agree sample by sample).
Shard folders (``n_shards > 1``) are partial runs and are skipped: merge them first.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from evaluators import results
from evaluators.errors import HarnessError
from evaluators.run_folder import read_json

log = logging.getLogger(__name__)

DEFENSE_ORDER = ("none", "diffpure", "diffcap")
DEFENSE_LABEL = {"none": "none", "diffpure": "DiffPure", "diffcap": "DiffCAP"}
TASK_LABEL = {"captioning": "captioning (CIDEr)", "vqa": "VQA (accuracy)", "classification": "zero-shot (top-1)"}


class CollectError(HarnessError):
    """The runs cannot be turned into one table (ambiguous or inconsistent cells)."""


@dataclass
class Entry:
    """One cell's data: per-sample primary-metric values ((n,) or (n, draws)) and the reported corpus values."""

    facets: dict[str, Any]
    task: str
    metric: str
    ids: list[str]
    values: np.ndarray
    reported: dict[str, float]          # "mean" (and "worst") from summary.json
    scale: float
    run: Path
    seeds: dict[str, Any]
    draws: int
    seconds: dict[str, float] = field(default_factory=dict)
    stopping_t: list[float] = field(default_factory=list)
    purify_seconds: list[float] = field(default_factory=list)
    denoiser_evals: list[float] = field(default_factory=list)


def strength_label(attack: dict) -> str:
    eps = attack.get("eps")
    eps_s = f"{eps:g}/255" if isinstance(eps, (int, float)) else str(eps)
    return eps_s if attack["name"] in ("apgd", "apgd_ensemble") else f"{attack['name']} {eps_s}"


def run_facets(cfg: dict) -> dict[str, Any]:
    d = cfg["defense"]
    return {"vlm": cfg["vlm"]["name"], "dataset": cfg["dataset"]["name"], "defense": d["name"],
            "tau": d.get("tau") if d["name"] == "diffcap" else None,
            "step": d.get("step") if d["name"] == "diffcap" else None,
            "t_star": d.get("t_star") if d["name"] == "diffpure" else None,
            "attack": cfg["attack"]["name"], "steps": cfg["attack"].get("steps"), "n_samples": cfg.get("n_samples"),
            "draws": (cfg["attack"].get("eval_draws") or d.get("eval_draws")) if d["name"] != "none" else None}


def find_runs(roots: list[Path]) -> list[Path]:
    out = []
    for root in roots:
        if not root.is_dir():
            raise CollectError(f"{root} is not a folder; pass the folder that holds the runs")
        for p in sorted(root.rglob(results.SUMMARY)):
            cfg = read_json(p, "the run's summary").get("config", {})
            if int(cfg.get("n_shards", 1) or 1) > 1:
                log.info("skipping shard %s (merge the shards first)", p.parent)
                continue
            out.append(p.parent)
    return out


def _values(records: list[dict], cond: str, metric: str) -> np.ndarray:
    rows = []
    for r in records:
        m = r["metrics"][cond]
        rows.append([d[metric] for d in m] if isinstance(m, list) else m[metric])
    return np.asarray(rows, dtype=float)


def entries_of_run(run_dir: Path) -> list[Entry]:
    """The entries of one finished run: per task, the clean strength and (if attacked) the attack strength."""
    summary = read_json(run_dir / results.SUMMARY, "the run's summary")
    cfg = summary["config"]
    facets = run_facets(cfg)
    records = [r for r in results.read_records(run_dir / results.SAMPLES) if r.get("status") == "ok"]
    out = []
    for task, metrics in summary["metrics"].items():
        recs = sorted((r for r in records if r["task"] == task), key=lambda r: r["id"])
        if not recs:
            continue
        primary = _primary(recs[0])
        by_cond = metrics[primary]
        defended = facets["defense"] != "none"
        pairs = [("clean", "clean")] + ([(strength_label(cfg["attack"]), "adv")] if "adv" in by_cond else [])
        for strength, base in pairs:
            cond = f"{base}_defended" if defended else base
            if cond not in by_cond:
                continue
            values = _values(recs, cond, primary)
            reported = {"mean": by_cond[cond]}
            if f"{cond}_worst" in by_cond:
                reported["worst"] = by_cond[f"{cond}_worst"]
            scale = _scale(values, reported, f"{run_dir} ({task}, {cond})")
            out.append(Entry(
                facets={**facets, "strength": strength, "task": task}, task=task, metric=primary,
                ids=[r["id"] for r in recs], values=values, reported=reported, scale=float(scale), run=run_dir,
                seeds={**summary.get("seeds", {}), "n_samples": cfg.get("n_samples")},
                draws=values.shape[1] if values.ndim == 2 else 1,
                seconds={k: v / len(recs) for k, v in summary.get("timing_seconds", {}).get(task, {}).items()},
                stopping_t=[i["t"] for r in recs for i in r.get("defense", {}).get(cond, [])],
                purify_seconds=[i["seconds"] for r in recs for i in r.get("defense", {}).get(cond, [])],
                denoiser_evals=[i["denoiser_evals"] for r in recs for i in r.get("defense", {}).get(cond, [])],
            ))
    return out


def _scale(values: np.ndarray, reported: dict[str, float], where: str) -> float:
    """The factor (1 or 100) that turns the mean of the per-sample values into the run's corpus metric; an
    error when none does, so a table never shows intervals around another number than the run reports."""
    views = {"mean": values.mean(axis=1) if values.ndim == 2 else values}
    if values.ndim == 2:
        views["worst"] = values.min(axis=1)
    for scale in (100.0, 1.0):
        if all(abs(views[k].mean() * scale - v) <= 1e-6 * max(1.0, abs(v)) for k, v in reported.items()):
            return scale
    raise CollectError(f"{where}: the per-sample values do not reproduce the corpus metric of summary.json "
                       f"({reported}); re-score the run (scripts/rescore.py)")


def _primary(record: dict) -> str:
    """The task's headline metric: the first metric of the clean condition (each task scores exactly one)."""
    return next(iter(record["metrics"]["clean"]))


def collect(roots: list[Path]) -> list[Entry]:
    """All entries under ``roots``; the clean strength of one model/data/defense appears once (checked)."""
    seen: dict[tuple, Entry] = {}
    out = []
    for run_dir in find_runs(roots):
        for e in entries_of_run(run_dir):
            if e.facets["strength"] != "clean":
                out.append(e)
                continue
            key = tuple(sorted((k, str(v)) for k, v in e.facets.items() if k not in ("attack", "steps")))
            prev = seen.get(key)
            if prev is None:
                seen[key] = e
                out.append(e)
            elif prev.ids != e.ids or not np.allclose(prev.values, e.values, rtol=0, atol=1e-9):
                raise CollectError(f"the clean results of {prev.run} and {e.run} differ for the same model, data "
                                   "and defense; they cannot share a table (different code or seeds?)")
    return out
