"""Clean/adversarial image pairs of a data set outside a run (tau calibration, purifier benchmarks), made by
the harness's own attack and cache so that they are the very images a grey-box run evaluates."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from evaluators.errors import DataError
from evaluators.runner import Harness, adversarial_images, load_images
from evaluators.seeding import select_subset
from evaluators.tasks.base import Task
from evaluators.vlms.base import VLMAdapter

log = logging.getLogger(__name__)


@dataclass
class Pairs:
    vlm: VLMAdapter
    task: Task
    samples: list[dict]
    x: torch.Tensor
    x_adv: torch.Tensor


def clean_and_adversarial(cfg: DictConfig, task_name: str) -> Pairs:
    """The evaluated subset of ``task_name`` (``n_samples``, ``seed.subset``) and its ``cfg.attack`` images."""
    from attacks.cache import AdversarialCache

    if cfg.get("torch_threads"):
        torch.set_num_threads(int(cfg.torch_threads))
    if cfg.dataset.get("prepare") is not None:
        instantiate(cfg.dataset.prepare)
    vlm = instantiate(cfg.vlm.model).eval().requires_grad_(False)
    task = instantiate(cfg.dataset.tasks[task_name])
    ids = select_subset(task.source.ids, int(cfg.n_samples), int(cfg.seed.subset))
    task.prepare(ids)
    samples = [task.source.get(i) for i in ids]
    images, errors = load_images([s["image_path"] for s in samples])
    if any(errors):
        raise DataError(f"{sum(e is not None for e in errors)} of {len(errors)} images cannot be read (e.g. "
                        f"{next(e for e in errors if e)}); fix the data")
    x = vlm.to_pixels(images)
    h = Harness(cfg=cfg, run_dir=Path(cfg.paths.output_dir), vlm=vlm, tasks={task_name: task},
                attack=instantiate(cfg.attack.method),
                cache=AdversarialCache(Path(cfg.paths.cache_dir) / "adversarial"))
    bs = int(cfg.batch_size)
    x_adv = torch.cat([adversarial_images(h, task_name, task, samples[i : i + bs], x[i : i + bs])[0]
                       for i in range(0, len(samples), bs)])
    log.info("%d clean/adversarial pairs (cache: %s)", len(samples), h.cache.stats())
    return Pairs(vlm=vlm, task=task, samples=samples, x=x, x_adv=x_adv)
