"""Collect the summary.json of many runs into one table (markdown and CSV), e.g. a paper table.

    python scripts/make_table.py results/multiruns --out results/tables/shapes_greybox
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd


def rows(root: Path) -> list[dict]:
    out = []
    for path in sorted(root.rglob("summary.json")):
        s = json.loads(path.read_text())
        cfg = s["config"]
        base = {
            "vlm": cfg["vlm"]["name"], "dataset": cfg["dataset"]["name"], "attack": cfg["attack"]["name"],
            "eps": cfg["attack"].get("eps"), "defense": cfg["defense"]["name"], "tau": cfg["defense"].get("tau"),
            "t_star": cfg["defense"].get("t_star"), "n": None, "run": str(path.parent.relative_to(root)),
        }
        for task, metrics in s["metrics"].items():
            row = {**base, "task": task, "n": s["samples"][task]["evaluated"]}
            for metric, by_cond in metrics.items():
                for cond, value in by_cond.items():
                    row[f"{metric}/{cond}"] = round(value, 2)
            for cond, stats in s.get("defense", {}).get(task, {}).items():
                row[f"t_mean/{cond}"] = round(stats["t_mean"], 4)
                row[f"s_per_img/{cond}"] = round(stats["seconds_per_image"], 4)
            out.append(row)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="folder searched recursively for summary.json")
    parser.add_argument("--out", type=Path, help="write OUT.md and OUT.csv")
    args = parser.parse_args()
    table = pd.DataFrame(rows(args.root))
    if table.empty:
        raise SystemExit(f"error: no summary.json under {args.root}")
    table = table.dropna(axis=1, how="all").sort_values(["task", "attack", "defense", "tau"], na_position="first")
    shown = table.drop(columns=["run"])
    text = shown.to_markdown(index=False) if _has_tabulate() else shown.to_string(index=False)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text(text + "\n")
        table.to_csv(args.out.with_suffix(".csv"), index=False)


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    main()
