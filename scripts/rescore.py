"""Re-score a run from its samples.jsonl alone (no data set, no model): rewrites summary.json's metrics.

    python scripts/rescore.py results/runs/<run> [--dry-run]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluators import results  # noqa: E402
from evaluators.rescoring import rescore  # noqa: E402
from evaluators.runner import print_table  # noqa: E402


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
