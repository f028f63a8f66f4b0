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

from evaluators import results
from evaluators.errors import DamagedFileError, HarnessError, RunFolderError, cli
from evaluators.rescoring import rescore
from evaluators.run_folder import locked, read_json


def coverage(summary: dict) -> tuple[set, int]:
    """(task/metric/condition cells with a value, evaluated samples) of a summary, to compare two of them."""
    cells = {(t, m, c) for t, ms in (summary.get("metrics") or {}).items() if isinstance(ms, dict)
             for m, by in ms.items() if isinstance(by, dict) for c, v in by.items() if v is not None}
    evaluated = sum(int(v.get("evaluated", 0)) for v in (summary.get("samples") or {}).values() if isinstance(v, dict))
    return cells, evaluated


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
