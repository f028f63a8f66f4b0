"""Re-scoring a run from its records alone (no data set, no model): used by ``scripts/rescore.py`` and by the
shard merge, so a merged run and a re-scored run go through the same aggregation."""

from __future__ import annotations

import json
from pathlib import Path

from hydra.utils import get_class
from omegaconf import OmegaConf

from evaluators import results
from evaluators.datasets.base import SampleSource
from evaluators.runner import RUN_CONFIG
from evaluators.summary import sample_view, summarise
from evaluators.tasks.base import Task


def tasks_from_config(run_config: dict) -> dict[str, Task]:
    """Task objects with their scoring options but no data source: aggregation reads the records only.

    Captioning without ``prepare`` takes CIDEr's idf from the references of the records it aggregates,
    which for a complete run (or a complete merge of shards) is the whole evaluated subset."""
    out = {}
    for name, spec in run_config["dataset"]["tasks"].items():
        kwargs = {k: v for k, v in spec.items() if k not in ("_target_", "source")}
        out[name] = get_class(spec["_target_"])(source=None, **kwargs)
    return out


class RecordSource(SampleSource):
    """The annotations a task's ``prepare`` and ``aggregate`` read, rebuilt from a run's records."""

    def __init__(self, records: list[dict], ids: list[str]):
        self._ids = list(ids)
        self._samples = {r["id"]: sample_view(r) for r in records}

    @property
    def ids(self) -> list[str]:
        return self._ids

    def get(self, sample_id: str) -> dict:
        return self._samples[sample_id]


def rescore(run_dir: Path, extra: dict | None = None) -> dict:
    """The summary of the run in ``run_dir`` recomputed from ``samples.jsonl`` and ``run_config.json``.

    When every sample of a task's manifest has a record, the task is prepared on the manifest as the run
    prepared it (same ids, same order), so corpus metrics match the run's to the last bit."""
    run_config = json.loads((run_dir / RUN_CONFIG).read_text())
    wanted = run_config.get("tasks")
    tasks = tasks_from_config(run_config)
    if wanted:
        tasks = {k: v for k, v in tasks.items() if k in wanted}
    records = results.read_records(run_dir / results.SAMPLES)
    for name, task in tasks.items():
        manifest = results.manifest_path(run_dir, name)
        if not manifest.exists():
            continue
        ids = json.loads(manifest.read_text())["ids"]
        ok = [r for r in records if r["task"] == name and r.get("status") == "ok"]
        if ids and sorted(r["id"] for r in ok) == sorted(ids):
            task.source = RecordSource(ok, ids)
            task.prepare(ids)
    return summarise(run_dir, OmegaConf.create(run_config), tasks, extra=extra)
