"""Merge the shards of one sharded run (``n_shards=N shard=0..N-1``) into one run folder with its summary.json.

    python scripts/merge_shards.py results/multiruns/<sweep>/ --out results/runs/<run>-merged

Checks that every shard is present, finished and consistent (same config apart from ``shard``, same
manifests, same code and library versions) before writing anything; the summary is computed by the same
re-scoring code as scripts/rescore.py, with CIDEr's idf from the whole manifest.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from evaluators.errors import cli
from evaluators.runner import print_table
from evaluators.sharding import find_shard_dirs, merge_shards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shards", type=Path, nargs="+", help="shard run folders, or folders holding them")
    parser.add_argument("--out", type=Path, required=True, help="the merged run folder (must not hold a run)")
    args = parser.parse_args()
    summary = merge_shards(find_shard_dirs(args.shards), args.out)
    print_table(summary)
    print(f"merged {len(summary['shards'])} shards into {args.out}")


if __name__ == "__main__":
    cli(main)
