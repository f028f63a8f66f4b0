"""Compare undefended runs with RobustVLM's published numbers (scripts/reference_numbers.json): one line per
cell with the measured value, its 95 % bootstrap interval, the reference, the tolerance and PASS / FAIL.

    python run.py -m experiment=paper/reproduce          # on a GPU machine, with the real models and data
    python scripts/check_reproduction.py results/multiruns/paper/reproduce

A cell passes when |measured - reference| <= tolerance. ``dataset: average`` cells compare the mean over
the data sets that were run. Exit status 0 when every cell with a tolerance was run and passes, else 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from evaluators import bootstrap
from evaluators.collect import collect
from evaluators.errors import cli
from evaluators.run_folder import read_json

REFERENCE = Path(__file__).with_name("reference_numbers.json")


def check(entries: list, reference: dict) -> list[dict]:
    """One row per reference cell: measured value (or None when no run has it) and the verdict."""
    undefended = [e for e in entries if e.facets["defense"] == "none"]
    rows = []
    for cell in reference["cells"]:
        match = [e for e in undefended if e.facets["vlm"] == cell["vlm"] and e.facets["strength"] == cell["strength"]
                 and cell["dataset"] in (e.facets["dataset"], "average")]
        row = {**cell, "measured": None, "low": None, "high": None, "n": None, "verdict": "MISSING"}
        if match:
            row["measured"] = float(np.mean([e.reported["mean"] for e in match]))
            if len(match) == 1:
                est = bootstrap.interval(bootstrap.draws_view(match[0].values)["mean"], match[0].scale)
                row.update(low=est.low, high=est.high, n=len(match[0].ids))
            if cell["tolerance"] is None:
                row["verdict"] = "INFO"
            else:
                row["verdict"] = "PASS" if abs(row["measured"] - cell["value"]) <= cell["tolerance"] else "FAIL"
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("roots", type=Path, nargs="+", help="folders with the undefended runs")
    parser.add_argument("--reference", type=Path, default=REFERENCE)
    args = parser.parse_args()
    rows = check(collect(args.roots), read_json(args.reference, "the reference numbers"))
    print(f"{'vlm':<14}{'dataset':<10}{'strength':<9}{'measured':>10}{'95% CI':>18}{'reference':>11}{'tol':>6}  verdict")
    for r in rows:
        ci = f"[{r['low']:.1f}, {r['high']:.1f}]" if r["low"] is not None else ""
        meas = f"{r['measured']:.1f}" if r["measured"] is not None else "-"
        tol = f"{r['tolerance']:g}" if r["tolerance"] is not None else "-"
        print(f"{r['vlm']:<14}{r['dataset']:<10}{r['strength']:<9}{meas:>10}{ci:>18}{r['value']:>11.1f}{tol:>6}  {r['verdict']}")
    graded = [r for r in rows if r["tolerance"] is not None]
    passed = sum(r["verdict"] == "PASS" for r in graded)
    print(f"\n{passed} of {len(graded)} graded cells pass ({sum(r['verdict'] == 'MISSING' for r in graded)} missing)")
    sys.exit(0 if passed == len(graded) else 1)


if __name__ == "__main__":
    cli(main)
