"""Optional Weights & Biases logging (``logger=wandb``): config, summary metrics, a few example images.
Offline by default; it never asks for an API key (online mode without WANDB_API_KEY is refused by the config
checks, and a failed start is a one-line error)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


class WandbTracker:
    def __init__(self, cfg: DictConfig):
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        self.n_images = int(cfg.logger.n_images)
        # a bounded wait: with a bad key or no network, wandb would otherwise retry for minutes
        self.run = wandb.init(project=cfg.logger.project, mode=cfg.logger.mode, dir=str(cfg.logger.dir),
                              name=cfg.run_name, config=OmegaConf.to_container(cfg, resolve=True),
                              settings=wandb.Settings(init_timeout=float(cfg.logger.get("init_timeout", 30))))

    def finish(self, summary: dict, run_dir: Path) -> None:
        import wandb

        flat = {f"{task}/{metric}/{cond}": v for task, ms in summary["metrics"].items()
                for metric, by in ms.items() for cond, v in by.items()}
        self.run.log(flat)
        images = sorted(run_dir.glob("examples/*.png"))[: self.n_images]
        if images:
            self.run.log({"examples": [wandb.Image(str(p)) for p in images]})
        self.run.finish()
