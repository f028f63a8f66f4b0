"""The one-way pipeline: data -> (attack) -> (defense) -> VLM -> metric -> per-sample record.

For every sample one run records the clean prediction and, with an attack, the attacked one; with a defense,
both again after purification (over ``defense.eval_draws`` purification draws). One run is one table row.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from tqdm import tqdm

from attacks.orchestrate import adversarial_images
from diffcap.base import Purifier
from evaluators import results, run_folder
from evaluators.config import select_tasks, validate
from evaluators.datasets.manifests import evaluated_subset
from evaluators.errors import ConfigError, DataError, HarnessError
from evaluators.fingerprints import annotation_paths, checkpoint_paths, fingerprint_run
from evaluators.images import load_images
from evaluators.run_folder import RUN_CONFIG, without_places  # noqa: F401 (scripts read RUN_CONFIG here)
from evaluators.seeding import derive_seed, generators, select_subset
from evaluators.sharding import shard_slice
from evaluators.summary import summarise, write_summary
from evaluators.tasks.base import Task
from evaluators.vlms.base import VLMAdapter

log = logging.getLogger(__name__)



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
    #: {"weights": {config key: {file: sha256}}, "data": {task.key: sha256}}, see evaluators.fingerprints
    fingerprints: dict[str, Any] = field(default_factory=dict)
    #: the evaluated ids of each task (set by run_task; part of the cache key where the metric depends on them)
    subsets: dict[str, list[str]] = field(default_factory=dict)

    @property
    def eval_draws(self) -> int:
        """Purification draws per image: the attack's ``eval_draws`` (adaptive verdicts) else the defense's."""
        if self.defense is None:
            return 0
        return int(self.cfg.attack.get("eval_draws") or self.cfg.defense.get("eval_draws", 1))


def run(cfg: DictConfig) -> dict:
    """Run (or resume) the experiment described by ``cfg``; returns the summary dict.

    Order matters for trust: every config value is checked before anything loads; the run folder is locked and
    its previous config compared; data and weights are fingerprinted (and compared) before any model loads;
    ``run_config.json`` and ``.hydra/`` are written only once all of that has succeeded."""
    validate(cfg)
    run_dir = Path(cfg.paths.output_dir)
    with run_folder.locked(run_dir):
        previous = run_folder.read_run_config(run_dir)
        run_folder.check_resumable(run_dir, cfg, previous)
        harness = build(cfg, run_dir, previous)
        run_folder.write_run_config(run_dir, cfg, harness.fingerprints)
        run_folder.save_hydra_record(run_dir, cfg)
        tracker = instantiate_tracker(cfg)
        for name, task in harness.tasks.items():
            run_task(harness, name, task)
        return finish(harness, tracker)


def finish(harness: Harness, tracker: Any) -> dict:
    """summary.json and the table; a task none of whose samples could be evaluated is an error instead."""
    run_dir = harness.run_dir
    records = results.read_records(run_dir / results.SAMPLES)
    for name in harness.tasks:
        errors = [r for r in records if r["task"] == name and r["status"] != "ok"]
        if errors and not any(r["task"] == name and r["status"] == "ok" for r in records):
            raise DataError(f"task {name}: none of its {len(errors)} samples could be used (e.g. {errors[0]['error']});"
                            " fix the data, or leave the task out with tasks=[...]")
    summary = summarise(run_dir, harness.cfg, harness.tasks, extra=run_info(harness))
    write_summary(run_dir, summary)
    log.info("results: %s", run_dir)
    print_table(summary)
    if tracker is not None:
        tracker.finish(summary, run_dir)
    return summary


def build(cfg: DictConfig, run_dir: Path, previous: dict | None = None) -> Harness:
    """Data, fingerprints (compared with ``previous``, the folder's run_config), then the models."""
    from evaluators.config import vlm_tasks

    device = torch.device(cfg.device)
    if cfg.get("torch_threads"):
        torch.set_num_threads(int(cfg.torch_threads))
    names = select_tasks(cfg, vlm_tasks(cfg))
    if cfg.vlm.get("check") is not None:
        instantiate(cfg.vlm.check)  # the model's files, before data or weights load: a wrong path fails at once
    if "captioning" in names:
        from evaluators.metrics.cider import check_java

        check_java()  # before any model is loaded: CIDEr's tokenizer needs Java
    if cfg.dataset.get("prepare") is not None:
        instantiate(cfg.dataset.prepare)
    fingerprints = fingerprint_run(cfg, names)
    run_folder.check_fingerprints(run_dir, previous, fingerprints,
                                  {**checkpoint_paths(cfg), **annotation_paths(cfg, names)})
    vlm: VLMAdapter = instantiate(cfg.vlm.model)
    vlm = vlm.to(device).eval().requires_grad_(False)
    # demonstrations are drawn per sample with seed.subset (a run-level seed, so not part of the task config)
    tasks = {name: instantiate(cfg.dataset.tasks[name], demo_seed=int(cfg.seed.subset))
             for name in select_tasks(cfg, vlm.tasks)}
    defense = build_defense(cfg, vlm, device)
    attack = instantiate(cfg.attack.method) if cfg.attack.get("method") is not None else None
    cache = None
    if attack is not None:
        from attacks.cache import AdversarialCache

        cache = AdversarialCache(Path(cfg.paths.cache_dir) / "adversarial")
    h = Harness(cfg=cfg, run_dir=run_dir, vlm=vlm, tasks=tasks, defense=defense, attack=attack, cache=cache,
                fingerprints=fingerprints)
    if defense is not None and defense.randomized and h.eval_draws == 1:
        log.warning("randomized defense evaluated with a single purification draw: results overestimate "
                    "robustness (set defense.eval_draws >= 3)")
    return h


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


# --------------------------------------------------------------------------------------------- one task


def run_task(h: Harness, name: str, task: Task) -> None:
    drawn = evaluated_subset(task.source, name, h.cfg.n_samples, int(h.cfg.seed.subset),
                             h.cfg.dataset.get("manifests"))
    subset = drawn["ids"]
    manifest = results.manifest_path(h.run_dir, name)
    if manifest.exists():
        listed = run_folder.read_json(manifest, f"the evaluated subset of {name}")
        if not isinstance(listed, dict) or listed.get("ids") != subset:
            raise ConfigError(f"{manifest} lists another subset than this config draws; delete the run folder")
    results.write_json_atomic(manifest, drawn)
    task.prepare(subset)
    h.subsets[name] = subset
    subset = shard_slice(subset, h.cfg)  # sharded job: its part only; the idf above comes from the whole subset
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
        x_adv, attack_info = adversarial_images(h, name, task, samples, x)
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
    """What summary.json records besides the metrics: the fingerprints of the weights and annotation files the
    results came from, and the adversarial cache's counters."""
    info: dict[str, Any] = {"fingerprints": h.fingerprints}
    if h.cache is not None:
        info["cache"] = h.cache.stats()
    return info


def print_table(summary: dict) -> None:
    """The run's row of a paper table, on stdout."""
    print(format_table({"": summary}))


def format_table(summaries: dict[str, dict]) -> str:
    """Rows (run label, task, metric) x the conditions of all runs (in first-seen order); '-' where a run has
    no such condition. With one unlabelled run this is that run's table row."""
    conds = list(dict.fromkeys(c for s in summaries.values() for c in s["conditions"]))
    width = max([len(k) for k in summaries] + [0])
    label = (lambda k: f"{k:<{width + 2}}") if width else (lambda k: "")
    lines = ["", label("run") + f"{'task':<16}{'metric':<10}" + "".join(f"{c:>22}" for c in conds)]
    for key, summary in summaries.items():
        for task, metrics in summary["metrics"].items():
            for metric, by_cond in metrics.items():
                cells = "".join(f"{_fmt(by_cond.get(c)):>22}" for c in conds)
                lines.append(f"{label(key)}{task:<16}{metric:<10}{cells}")
    return "\n".join(lines) + "\n"


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.2f}"


def instantiate_tracker(cfg: DictConfig) -> Any:
    if not cfg.logger.get("enabled", False):
        return None
    from evaluators.tracking import WandbTracker

    try:
        return WandbTracker(cfg)
    except Exception as e:  # wandb raises its own types for a bad key, no network, a timeout
        raise HarnessError(f"wandb could not start ({' '.join(str(e).split())[:160]}); use WANDB_MODE=offline "
                           "or logger=none") from e


def clean_and_adversarial(h: Harness, task_name: str) -> tuple[list[dict], torch.Tensor, torch.Tensor]:
    """The evaluated subset of ``task_name`` (``n_samples``, ``seed.subset``), its clean pixels and its ``attack``
    images (through the cache): what the calibration and benchmark scripts measure on."""
    task = h.tasks[task_name]
    ids = select_subset(task.source.ids, int(h.cfg.n_samples), int(h.cfg.seed.subset))
    task.prepare(ids)
    h.subsets[task_name] = ids
    samples = [task.source.get(i) for i in ids]
    images, errors = load_images([s["image_path"] for s in samples])
    if any(errors):
        raise DataError(f"{sum(e is not None for e in errors)} of {len(errors)} images cannot be read (e.g. "
                        f"{next(e for e in errors if e)}); fix the data")
    x = h.vlm.to_pixels(images).to(torch.device(h.cfg.device))
    bs = int(h.cfg.batch_size)
    x_adv = torch.cat([adversarial_images(h, task_name, task, samples[i : i + bs], x[i : i + bs])[0]
                       for i in range(0, len(samples), bs)])
    return samples, x, x_adv
