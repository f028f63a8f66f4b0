"""Re-score a run from its samples.jsonl alone (no data set, no model): rewrites summary.json's metrics.

    python scripts/rescore.py results/runs/<run> [--dry-run]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hydra.utils import get_class
from omegaconf import OmegaConf

from evaluators import results
from evaluators.runner import RUN_CONFIG, print_table
from evaluators.summary import summarise
from evaluators.tasks.base import Task


def tasks_from_config(run_config: dict) -> dict[str, Task]:
    """Task objects with their scoring options but no data source: aggregation reads the records only."""
    out = {}
    for name, spec in run_config["dataset"]["tasks"].items():
        kwargs = {k: v for k, v in spec.items() if k not in ("_target_", "source")}
        out[name] = get_class(spec["_target_"])(source=None, **kwargs)
    return out


def rescore(run_dir: Path) -> dict:
    run_config = json.loads((run_dir / RUN_CONFIG).read_text())
    tasks = tasks_from_config(run_config)
    return summarise(run_dir, OmegaConf.create(run_config), tasks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--dry-run", action="store_true", help="print the table, do not write summary.json")
    args = parser.parse_args()
    if not (args.run_dir / results.SAMPLES).exists():
        sys.exit(f"error: no {results.SAMPLES} in {args.run_dir}; pass a run folder under results/runs/")
    summary = rescore(args.run_dir)
    old = args.run_dir / results.SUMMARY
    if old.exists():
        previous = json.loads(old.read_text())
        summary = {**previous, **{k: summary[k] for k in ("metrics", "conditions", "samples", "defense", "attack")}}
    print_table(summary)
    if not args.dry_run:
        results.write_json_atomic(old, summary)


if __name__ == "__main__":
    main()
