"""Optional Weights & Biases logging (``logger=wandb``): each run logs its config, metrics, runtime, the
histogram of DiffCAP/DiffPure stopping times and a few example images; all runs of one multirun share one
wandb group (the sweep folder), so a paper table is one group.

Offline by default (``WANDB_MODE`` or ``logger.mode``); it never asks for an API key (online mode without
WANDB_API_KEY is refused by the config checks, and a failed start is a one-line error).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def group_name(cfg: DictConfig) -> str | None:
    """The multirun's sweep folder (one wandb group per multirun); None for a single run."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if cfg.logger.get("group"):
        return str(cfg.logger.group)
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return str(HydraConfig.get().sweep.dir)
    return None


def flat_metrics(summary: dict) -> dict[str, float]:
    """``task/metric/condition`` -> value, and the per-stage seconds per sample as ``task/seconds/stage``."""
    out = {f"{task}/{metric}/{cond}": v for task, ms in summary["metrics"].items()
           for metric, by in ms.items() for cond, v in by.items()}
    for task, stages in summary.get("timing_seconds", {}).items():
        n = max(1, summary["samples"][task]["evaluated"])
        out.update({f"{task}/seconds_per_sample/{stage}": s / n for stage, s in stages.items()})
    for task, conds in summary.get("defense", {}).items():
        for cond, stats in conds.items():
            out.update({f"{task}/defense/{cond}/{k}": v for k, v in stats.items()})
    return out


def stopping_times(run_dir: Path) -> dict[str, list[float]]:
    """Per task and condition, the purifier's per-image stopping times of every draw (from samples.jsonl)."""
    from evaluators import results

    out: dict[str, list[float]] = {}
    for r in results.read_records(run_dir / results.SAMPLES):
        for cond, draws in (r.get("defense") or {}).items():
            out.setdefault(f"{r['task']}/stopping_time/{cond}", []).extend(d["t"] for d in draws)
    return out


class WandbTracker:
    """One wandb run per harness run; ``finish`` logs everything at the end (records are on disk anyway)."""

    def __init__(self, cfg: DictConfig):
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        self.n_images = int(cfg.logger.n_images)
        Path(str(cfg.logger.dir)).mkdir(parents=True, exist_ok=True)
        # a bounded wait: with a bad key or no network, wandb would otherwise retry for minutes
        self.run = wandb.init(project=cfg.logger.project, mode=cfg.logger.mode, dir=str(cfg.logger.dir),
                              name=cfg.run_name, group=group_name(cfg), config=OmegaConf.to_container(cfg, resolve=True),
                              reinit="finish_previous",
                              settings=wandb.Settings(init_timeout=float(cfg.logger.get("init_timeout", 30))))

    def finish(self, summary: dict, run_dir: Path) -> None:
        import wandb

        payload: dict[str, Any] = dict(flat_metrics(summary))
        for key, ts in stopping_times(run_dir).items():
            payload[key] = wandb.Histogram(ts)
        images = sorted(run_dir.glob("examples/*.png"))[: self.n_images]
        if images:
            payload["examples"] = [wandb.Image(str(p), caption=p.stem) for p in images]
        self.run.log(payload)
        self.run.summary.update(flat_metrics(summary))
        self.run.finish()
