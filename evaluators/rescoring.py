"""Re-scoring a run from its records alone (no data set, no model): used by ``scripts/rescore.py`` and by the
shard merge (``evaluators/sharding.py``), so a merged run and a re-scored run go through the same checks and
the same aggregation."""

from __future__ import annotations

from pathlib import Path

from hydra.utils import get_class
from omegaconf import OmegaConf

from evaluators import results
from evaluators.datasets.base import SampleSource
from evaluators.errors import DamagedFileError, HarnessError, RunFolderError
from evaluators.run_folder import RUN_CONFIG, read_json, read_run_config
from evaluators.summary import sample_view, summarise
from evaluators.tasks.base import Task


def tasks_from_config(run_config: dict) -> dict[str, Task]:
    """Task objects with their scoring options but no data source: aggregation reads the records only."""
    out = {}
    for name, spec in run_config["dataset"]["tasks"].items():
        kwargs = {k: v for k, v in spec.items() if k not in ("_target_", "source")}
        out[name] = get_class(spec["_target_"])(source=None, **kwargs)
    return out


def evaluated_tasks(run_dir: Path, run_config: dict) -> dict[str, list[str]]:
    """{task: manifest ids} of the tasks this run evaluated (those with a manifest)."""
    out = {}
    for name in run_config["dataset"]["tasks"]:
        path = results.manifest_path(run_dir, name)
        if path.exists():
            manifest = read_json(path, f"the evaluated subset of {name}")
            if not isinstance(manifest, dict) or not isinstance(manifest.get("ids"), list):
                raise DamagedFileError(f"{path} has no 'ids' list; delete the run folder and run it again")
            out[name] = [str(i) for i in manifest["ids"]]
    if not out:
        raise HarnessError(f"{run_dir} has no manifest_<task>.json; it is not a run folder, or its run never started")
    return out


def check_coverage(run_dir: Path, records: list[dict], wanted: dict[str, list[str]]) -> None:
    """Every manifest id has exactly one record and nothing else is there: else the summary would be wrong."""
    for name, ids in wanted.items():
        got = [r["id"] for r in records if r["task"] == name]
        missing = sorted(set(ids) - set(got))
        extra = sorted(set(got) - set(ids))
        if missing or extra or len(got) != len(set(got)):
            what = (f"lacks {len(missing)} of its {len(ids)} samples" if missing else
                    f"has {len(extra)} records outside its manifest" if extra else "has duplicate records")
            raise RunFolderError(f"{run_dir / results.SAMPLES}: task {name} {what}; finish the run by re-running "
                                 "its command (it resumes), then re-score; nothing was written")


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

    Refuses a run whose records do not cover its manifests exactly. When every sample of a task's manifest has
    an ``ok`` record, the task is prepared on the manifest as the run prepared it (same ids, same order), so
    corpus metrics (CIDEr's idf) match the run's to the last bit."""
    run_config = read_run_config(run_dir)
    if run_config is None:
        raise HarnessError(f"no {RUN_CONFIG} in {run_dir}; pass a run folder under results/runs/")
    records = results.read_records(run_dir / results.SAMPLES)
    wanted = evaluated_tasks(run_dir, run_config)
    check_coverage(run_dir, records, wanted)
    tasks = {k: v for k, v in tasks_from_config(run_config).items() if k in wanted}
    for name, task in tasks.items():
        ok = [r for r in records if r["task"] == name and r.get("status") == "ok"]
        if sorted(r["id"] for r in ok) == sorted(wanted[name]):
            task.source = RecordSource(ok, wanted[name])
            task.prepare(wanted[name])
    return summarise(run_dir, OmegaConf.create(run_config), tasks, extra=extra)
