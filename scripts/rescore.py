"""Re-score a run from its samples.jsonl alone (no data set, no model): rewrites summary.json's metrics.

    python scripts/rescore.py results/runs/<run> [--dry-run]

It refuses to write when the records do not cover every sample of the run's manifests (an interrupted run: resume
it with the same command first), and never replaces a summary with one that covers fewer tasks, conditions or
samples. The new summary is written atomically.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hydra.utils import get_class
from omegaconf import OmegaConf

from evaluators import results
from evaluators.errors import DamagedFileError, HarnessError, RunFolderError, cli
from evaluators.run_folder import RUN_CONFIG, locked, read_json, read_run_config
from evaluators.summary import summarise
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


def coverage(summary: dict) -> tuple[set, int]:
    """(task/metric/condition cells with a value, evaluated samples) of a summary, to compare two of them."""
    cells = {(t, m, c) for t, ms in (summary.get("metrics") or {}).items() if isinstance(ms, dict)
             for m, by in ms.items() if isinstance(by, dict) for c, v in by.items() if v is not None}
    evaluated = sum(int(v.get("evaluated", 0)) for v in (summary.get("samples") or {}).values() if isinstance(v, dict))
    return cells, evaluated


def rescore(run_dir: Path) -> dict:
    run_config = read_run_config(run_dir)
    if run_config is None:
        raise HarnessError(f"no {RUN_CONFIG} in {run_dir}; pass a run folder under results/runs/")
    records = results.read_records(run_dir / results.SAMPLES)
    check_coverage(run_dir, records, evaluated_tasks(run_dir, run_config))
    tasks = {k: v for k, v in tasks_from_config(run_config).items() if k in evaluated_tasks(run_dir, run_config)}
    return summarise(run_dir, OmegaConf.create(run_config), tasks)


def merged(run_dir: Path, summary: dict) -> dict:
    """The new metrics inside the old summary's other fields, unless the old one is better covered."""
    old = run_dir / results.SUMMARY
    if not old.exists():
        return summary
    try:
        previous = read_json(old, "the run's summary")
    except DamagedFileError:
        print(f"warning: {old} is damaged; it is replaced", file=sys.stderr)
        return summary
    if not isinstance(previous, dict):
        return summary
    (old_cells, old_n), (new_cells, new_n) = coverage(previous), coverage(summary)
    if not old_cells <= new_cells or new_n < old_n:
        raise RunFolderError(f"the re-scored summary covers less than {old} (cells {len(new_cells)} vs "
                             f"{len(old_cells)}, samples {new_n} vs {old_n}); it was left as it was")
    return {**previous, **{k: summary[k] for k in ("metrics", "conditions", "samples", "defense", "attack")}}


def main() -> None:
    from evaluators.runner import print_table

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--dry-run", action="store_true", help="print the table, do not write summary.json")
    args = parser.parse_args()
    if not (args.run_dir / results.SAMPLES).is_file():
        raise HarnessError(f"no {results.SAMPLES} in {args.run_dir}; pass a run folder under results/runs/")
    with locked(args.run_dir):
        summary = merged(args.run_dir, rescore(args.run_dir))
        print_table(summary)
        if not args.dry_run:
            results.write_json_atomic(args.run_dir / results.SUMMARY, summary)


if __name__ == "__main__":
    cli(main)
