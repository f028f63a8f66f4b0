"""What a model that never looks at the image scores on a data set's evaluated subset: the floor every trained
model is compared with (the tiny models' targets are stated against it).

* captioning: the most common sentence of the Karpathy file's train split, for every image;
* VQA: the most common train answer among train questions that start with the same three words
  ("how many shapes", "what color is"), else the most common train answer;
* classification: chance, 100 / number of classes.

Scored by the tasks' own metrics (CIDEr with the evaluated subset's idf, VQA accuracy) on the subset a run with
the same overrides evaluates (``n_samples``, ``seed.subset``, the data set's prepared manifest).

    python scripts/trivial_baselines.py                       # the shapes world; writes results/calibration/
    python scripts/trivial_baselines.py dataset=coco n_samples=500

Arguments key=value are Hydra overrides of configs/run.yaml; no model is loaded.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from hydra.utils import instantiate

from evaluators.config import PROJECT_ROOT, compose_config, validate
from evaluators.datasets.manifests import evaluated_subset
from evaluators.errors import DataError, cli
from evaluators.tasks.base import Task


def question_key(question: str) -> str:
    """The first three words, lower-case: a stand-in for VQAv2's question type."""
    return " ".join(question.lower().rstrip("?").split()[:3])


def train_captions(karpathy_file: str | Path) -> list[str]:
    """Every raw sentence of the Karpathy file's train images (split "train" or "restval")."""
    try:
        images = json.loads(Path(karpathy_file).read_text())["images"]
        return [s["raw"] for e in images if e.get("split") in ("train", "restval") for s in e["sentences"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{karpathy_file}: cannot read the train sentences ({e!r})") from e


def caption_rule(cfg: Any) -> Any:
    captions = train_captions(cfg.dataset.tasks.captioning.source.karpathy_file)
    if not captions:
        raise DataError(f"{cfg.dataset.tasks.captioning.source.karpathy_file} has no train sentences")
    common = Counter(captions).most_common(1)[0][0]
    return lambda sample: common


def vqa_rule(task: Task) -> Any:
    by_key: dict[str, Counter] = {}
    overall: Counter = Counter()
    for d in task.source.demonstrations():
        by_key.setdefault(question_key(d["question"]), Counter())[d["answer"]] += 1
        overall[d["answer"]] += 1
    fallback = overall.most_common(1)[0][0]
    return lambda sample: (by_key.get(question_key(sample["question"])) or Counter({fallback: 1})).most_common(1)[0][0]


def baselines(overrides: list[str]) -> dict[str, dict[str, Any]]:
    cfg = compose_config(overrides)
    validate(cfg)
    if cfg.dataset.get("prepare") is not None:
        instantiate(cfg.dataset.prepare)
    out: dict[str, dict[str, Any]] = {}
    for name in cfg.dataset.tasks:
        task: Task = instantiate(cfg.dataset.tasks[name], demo_seed=int(cfg.seed.subset))
        drawn = evaluated_subset(task.source, name, cfg.n_samples, int(cfg.seed.subset), cfg.dataset.get("manifests"))
        ids = drawn["ids"]
        if name == "classification":
            n_classes = len(task.source.classnames)
            out[name] = {"rule": f"chance (1 of {n_classes} classes)", "top1": 100.0 / n_classes, "n": len(ids)}
            continue
        rule = caption_rule(cfg) if name == "captioning" else vqa_rule(task)
        task.prepare(ids)
        samples = {i: task.source.get(i) for i in ids}
        predictions = {i: rule(s) for i, s in samples.items()}
        metrics = task.aggregate(predictions, samples)
        out[name] = {"rule": "most common train caption" if name == "captioning" else
                     "most common train answer per question's first three words", **metrics, "n": len(ids),
                     "example": next(iter(predictions.values()))}
    result = {"dataset": cfg.dataset.name, "n_samples": cfg.n_samples, "seed_subset": int(cfg.seed.subset),
              "tasks": out}
    path = PROJECT_ROOT / "results" / "calibration" / f"trivial_{cfg.dataset.name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def main() -> None:
    print(json.dumps(baselines(sys.argv[1:]), indent=2))


if __name__ == "__main__":
    cli(main)
