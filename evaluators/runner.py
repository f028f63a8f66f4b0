"""The one-way pipeline: data -> (attack) -> (defense) -> VLM -> metric -> per-sample record.

For every sample one run records the clean prediction and, with an attack, the attacked one; with a defense,
both again after purification (over ``defense.eval_draws`` purification draws). One run is one table row.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from tqdm import tqdm

from attacks.orchestrate import adversarial_images
from diffcap.base import Purifier
from evaluators import results
from evaluators.config import validate
from evaluators.errors import ConfigError
from evaluators.seeding import derive_seed, generators, select_subset
from evaluators.summary import summarise, write_summary
from evaluators.tasks.base import Task
from evaluators.vlms.base import VLMAdapter

log = logging.getLogger(__name__)

#: Config keys that do not change results; a run directory may be resumed with other values for them.
RESUME_FREE_KEYS = ("resume", "device", "logger", "paths", "torch_threads")
RUN_CONFIG = "run_config.json"


@dataclass
class Harness:
    """Everything one run is built from; made by ``build`` from the composed config."""

    cfg: DictConfig
    run_dir: Path
    vlm: VLMAdapter
    tasks: dict[str, Task]
    defense: Purifier | None = None
    attack: Any = None
    cache: Any = None
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def eval_draws(self) -> int:
        """Purification draws per image: the attack's ``eval_draws`` (adaptive verdicts) else the defense's."""
        if self.defense is None:
            return 0
        return int(self.cfg.attack.get("eval_draws") or self.cfg.defense.get("eval_draws", 1))


def run(cfg: DictConfig) -> dict:
    """Run (or resume) the experiment described by ``cfg``; returns the summary dict."""
    validate(cfg)
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    check_resumable(run_dir, cfg)
    harness = build(cfg, run_dir)
    tracker = instantiate_tracker(cfg)
    for name, task in harness.tasks.items():
        run_task(harness, name, task)
    summary = summarise(run_dir, harness.cfg, harness.tasks, extra=run_info(harness))
    write_summary(run_dir, summary)
    log.info("results: %s", run_dir)
    print_table(summary)
    if tracker is not None:
        tracker.finish(summary, run_dir)
    return summary


def build(cfg: DictConfig, run_dir: Path) -> Harness:
    device = torch.device(cfg.device)
    if cfg.get("torch_threads"):
        torch.set_num_threads(int(cfg.torch_threads))
    if "captioning" in (cfg.get("tasks") or cfg.dataset.tasks):
        from evaluators.metrics.cider import check_java

        check_java()  # before any model is loaded: CIDEr's tokenizer needs Java
    if cfg.dataset.get("prepare") is not None:
        instantiate(cfg.dataset.prepare)
    vlm: VLMAdapter = instantiate(cfg.vlm.model)
    vlm = vlm.to(device).eval().requires_grad_(False)
    tasks = {name: instantiate(cfg.dataset.tasks[name]) for name in select_tasks(cfg, vlm)}
    defense = build_defense(cfg, vlm, device)
    attack = instantiate(cfg.attack.method) if cfg.attack.get("method") is not None else None
    cache = None
    if attack is not None:
        from attacks.cache import AdversarialCache

        cache = AdversarialCache(Path(cfg.paths.cache_dir) / "adversarial")
    h = Harness(cfg=cfg, run_dir=run_dir, vlm=vlm, tasks=tasks, defense=defense, attack=attack, cache=cache)
    if defense is not None and defense.randomized and h.eval_draws == 1:
        log.warning("randomized defense evaluated with a single purification draw: results overestimate "
                    "robustness (set defense.eval_draws >= 3)")
    return h


def select_tasks(cfg: DictConfig, vlm: VLMAdapter) -> list[str]:
    offered = list(cfg.dataset.tasks.keys())
    wanted = list(cfg.tasks) if cfg.get("tasks") else [t for t in offered if t in vlm.tasks]
    for t in wanted:
        if t not in offered:
            raise ConfigError(f"dataset={cfg.dataset.name} has no task '{t}'; it offers {offered}")
        if t not in vlm.tasks:
            raise ConfigError(f"vlm={cfg.vlm.name} cannot do '{t}'; it does {list(vlm.tasks)}")
    if not wanted:
        raise ConfigError(
            f"vlm={cfg.vlm.name} (tasks {list(vlm.tasks)}) and dataset={cfg.dataset.name} "
            f"(tasks {offered}) share no task"
        )
    return wanted


def build_defense(cfg: DictConfig, vlm: VLMAdapter, device: torch.device) -> Purifier | None:
    if cfg.defense.get("purifier") is None:
        return None
    kwargs = {}
    if cfg.defense.get("encoder") == "clip":
        encoder = instantiate(cfg.dataset.fixed_encoder).to(device).eval().requires_grad_(False)
        kwargs["encoder_model"] = encoder
    defense: Purifier = instantiate(cfg.defense.purifier, **kwargs)
    defense = defense.to(device).eval().requires_grad_(False)
    defense.attach(vlm)
    return defense


def check_resumable(run_dir: Path, cfg: DictConfig) -> None:
    """A run directory holds one config: resuming with a different one would mix results."""
    current = result_config(cfg)
    path = run_dir / RUN_CONFIG
    if path.exists():
        previous, now = flatten(json.loads(path.read_text())), flatten(current)
        if previous != now:
            diff = sorted(k for k in set(previous) | set(now) if previous.get(k) != now.get(k))
            raise ConfigError(
                f"{run_dir} already holds a run with a different config (differs in {', '.join(diff)}); "
                "delete that folder or choose another with hydra.run.dir=..."
            )
        if not cfg.resume:
            raise ConfigError(f"{run_dir} already holds this run and resume=false; delete the folder to start over")
    else:
        results.write_json_atomic(path, current)


def result_config(cfg: DictConfig) -> dict:
    """The resolved config minus the keys that do not change results (written as run_config.json)."""
    container = OmegaConf.to_container(cfg, resolve=True)
    for key in RESUME_FREE_KEYS:
        container.pop(key, None)
    return container


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(node, dict):
        return {prefix: node}
    flat: dict[str, Any] = {}
    for k, v in node.items():
        flat.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return flat


# --------------------------------------------------------------------------------------------- one task


def run_task(h: Harness, name: str, task: Task) -> None:
    ids = task.source.ids
    subset = select_subset(ids, int(h.cfg.n_samples), int(h.cfg.seed.subset))
    manifest = results.manifest_path(h.run_dir, name)
    if manifest.exists() and json.loads(manifest.read_text())["ids"] != subset:
        raise ConfigError(f"{manifest} lists another subset than this config draws; delete the run folder")
    results.write_json_atomic(manifest, {"task": name, "seed": int(h.cfg.seed.subset), "n": len(subset),
                                         "of": len(ids), "ids": subset})
    task.prepare(subset)
    bs = int(h.cfg.batch_size)
    batches = [subset[i : i + bs] for i in range(0, len(subset), bs)]
    done = results.completed_batches(h.run_dir, name, {b: len(ids_b) for b, ids_b in enumerate(batches)})
    todo = [b for b in range(len(batches)) if b not in done]
    if len(todo) < len(batches):
        log.info("%s: resuming, %d of %d batches already done", name, len(batches) - len(todo), len(batches))
    writer = results.RecordWriter(h.run_dir)
    bar = tqdm(total=len(subset), initial=len(subset) - sum(len(batches[b]) for b in todo),
               desc=name, unit="sample", dynamic_ncols=True)
    for b in todo:
        writer.write_batch(process_batch(h, name, task, b, batches[b]))
        bar.update(len(batches[b]))
    bar.close()


def load_images(paths: Sequence[str]) -> tuple[list[Image.Image | None], list[str | None]]:
    images, errors = [], []
    for p in paths:
        try:
            with Image.open(p) as im:
                images.append(im.convert("RGB"))
            errors.append(None)
        except (OSError, ValueError, SyntaxError) as e:
            log.warning("skipping unreadable image %s: %s", p, e)
            images.append(None)
            errors.append(f"unreadable image {p}: {e}")
    return images, errors


def process_batch(h: Harness, name: str, task: Task, index: int, ids: list[str]) -> list[dict]:
    seconds: dict[str, float] = {}
    tic = time.perf_counter()
    samples = [task.source.get(i) for i in ids]
    images, errors = load_images([s["image_path"] for s in samples])
    failed = [dict(task=name, batch=index, id=s["id"], status="error", error=e)
              for s, e in zip(samples, errors, strict=True) if e is not None]
    keep = [i for i, e in enumerate(errors) if e is None]
    samples = [samples[i] for i in keep]
    if not samples:
        return failed
    device = torch.device(h.cfg.device)
    x = h.vlm.to_pixels([images[i] for i in keep]).to(device)
    seconds["load"] = time.perf_counter() - tic

    predictions: dict[str, list] = {}
    metrics: dict[str, list] = {}
    purify_info: dict[str, list] = {}
    attack_info: list[dict] | None = None

    shown: dict[str, torch.Tensor] = {}

    def evaluate(condition: str, images_: torch.Tensor) -> None:
        shown[condition] = images_
        tic_ = time.perf_counter()
        with torch.no_grad():
            preds = task.predict(h.vlm, images_, samples)
        seconds["predict"] = seconds.get("predict", 0.0) + time.perf_counter() - tic_
        predictions[condition] = preds
        metrics[condition] = task.score(preds, samples)
        if h.defense is None:
            return
        draws_p, draws_m, draws_i = [], [], []
        for d in range(h.eval_draws):
            gens = generators([derive_seed(h.cfg.seed.noise, name, s["id"], condition, "purify", d) for s in samples],
                              device)
            tic_ = time.perf_counter()
            with torch.no_grad():
                x_pur, infos = h.defense.purify(images_, gens)
            seconds["defense"] = seconds.get("defense", 0.0) + time.perf_counter() - tic_
            tic_ = time.perf_counter()
            with torch.no_grad():
                preds = task.predict(h.vlm, x_pur, samples)
            seconds["predict"] += time.perf_counter() - tic_
            draws_p.append(preds)
            draws_m.append(task.score(preds, samples))
            draws_i.append([i.to_dict() for i in infos])
            if d == 0:
                shown[f"{condition}_defended"] = x_pur
        key = f"{condition}_defended"
        predictions[key] = [list(col) for col in zip(*draws_p, strict=True)]
        metrics[key] = [list(col) for col in zip(*draws_m, strict=True)]
        purify_info[key] = [list(col) for col in zip(*draws_i, strict=True)]

    evaluate("clean", x)
    if h.attack is not None:
        tic = time.perf_counter()
        x_adv, attack_info = adversarial_images(h.cfg, h.attack, h.cache, h.defense, h.vlm, name, task, samples, x,
                                                h.run_dir)
        seconds["attack"] = time.perf_counter() - tic
        evaluate("adv", x_adv)

    if index == 0:
        save_examples(h.run_dir / "examples", name, shown)
    n = len(samples)
    records = []
    for j, s in enumerate(samples):
        rec = {
            "task": name, "batch": index, "id": s["id"], "status": "ok",
            "inputs": task.inputs(s), "references": task.references(s),
            "predictions": {c: v[j] for c, v in predictions.items()},
            "metrics": {c: v[j] for c, v in metrics.items()},
            "seconds": {k: v / n for k, v in seconds.items()},
        }
        if purify_info:
            rec["defense"] = {c: v[j] for c, v in purify_info.items()}
        if attack_info is not None:
            rec["attack"] = attack_info[j]
        records.append(rec)
    return failed + records


def save_examples(folder: Path, task: str, shown: dict[str, torch.Tensor], n: int = 4) -> None:
    """A few images per condition of the first batch (PNG: for looking at, never for re-evaluation)."""
    from torchvision.utils import save_image

    folder.mkdir(exist_ok=True)
    for condition, images in shown.items():
        save_image(images[:n].detach().float().cpu(), folder / f"{task}_{condition}.png", nrow=n, padding=1)


# --------------------------------------------------------------------------------------------- attacks


# --------------------------------------------------------------------------------------------- reporting


def run_info(h: Harness) -> dict:
    info: dict[str, Any] = {}
    if h.cache is not None:
        info["cache"] = h.cache.stats()
    return info


def print_table(summary: dict) -> None:
    """The run's row of a paper table, on stdout."""
    lines = [f"\n{'task':<16}{'metric':<10}" + "".join(f"{c:>22}" for c in summary["conditions"])]
    for task, metrics in summary["metrics"].items():
        for metric, by_cond in metrics.items():
            cells = "".join(f"{_fmt(by_cond.get(c)):>22}" for c in summary["conditions"])
            lines.append(f"{task:<16}{metric:<10}{cells}")
    print("\n".join(lines) + "\n")


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.2f}"


def instantiate_tracker(cfg: DictConfig):
    if not cfg.logger.get("enabled", False):
        return None
    from evaluators.tracking import WandbTracker

    return WandbTracker(cfg)
