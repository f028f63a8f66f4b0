"""Paper tables from finished runs: Markdown, CSV and LaTeX, with 95 % bootstrap intervals over samples, the
spread over purification draws, and paired bootstrap differences between defenses (layout: README.md).

    python scripts/tables.py results/multiruns/embedded --out results/embedded/tables
    python scripts/tables.py results/multiruns/embedded/tau_ablation --rows tau,strength --cols dataset,vlm \\
        --name tau_ablation --out results/embedded/tables

One table per task (rows ``--rows``, columns ``--cols``, facets of the runs); a cell with no run is written
``missing`` (never 0). Randomized defenses show the mean over purification draws and the worst draw.
"""

from __future__ import annotations

import argparse
import itertools
from collections import defaultdict
from pathlib import Path

import pandas as pd

from evaluators import bootstrap
from evaluators.collect import DEFENSE_LABEL, DEFENSE_ORDER, TASK_LABEL, CollectError, Entry, collect
from evaluators.errors import cli

MISSING = "missing"


def facet_order(name: str, values: set) -> list:
    """Paper order: defenses none, DiffPure, DiffCAP; strengths clean, then by eps; others sorted."""
    if name == "defense":
        return [d for d in DEFENSE_ORDER if d in values] + sorted(v for v in values if v not in DEFENSE_ORDER)
    if name == "strength":
        rest = sorted((v for v in values if v != "clean"), key=lambda s: (not s[0].isdigit(), float(s.split("/")[0].split()[-1]), s))
        return (["clean"] if "clean" in values else []) + rest
    numeric = all(isinstance(v, int | float) for v in values if v is not None)
    return sorted(values, key=lambda v: (v is None, v if numeric and v is not None else 0, str(v)))


def label(name: str, value) -> str:
    if name == "defense":
        return DEFENSE_LABEL.get(value, str(value))
    return str(value) if name in ("strength", "dataset", "vlm") else f"{name}={value}"


def cell_rows(entry: Entry) -> list[dict]:
    """The numbers of one cell: the mean (and worst draw for randomized defenses), each with its interval."""
    out = []
    views = bootstrap.draws_view(entry.values)
    spread = bootstrap.draw_spread(entry.values, entry.scale)
    for stat, per_sample in views.items():
        est = bootstrap.interval(per_sample, entry.scale)
        reported = entry.reported[stat]
        out.append({"stat": stat, "value": reported, "ci_low": est.low, "ci_high": est.high,
                    "draw_sd": spread if stat == "mean" else None, "n": len(entry.ids), "draws": entry.draws,
                    "run": str(entry.run)})
    return out


def build(entries: list[Entry], task: str, rows: list[str], cols: list[str]) -> tuple[pd.DataFrame, dict]:
    """Long-form cells of one task's table (every row x column combination, missing ones included)."""
    mine = [e for e in entries if e.task == task]
    values = {f: {e.facets[f] for e in mine} for f in rows + cols}
    row_keys = list(itertools.product(*(facet_order(f, values[f]) for f in rows)))
    col_keys = list(itertools.product(*(facet_order(f, values[f]) for f in cols)))
    by_cell: dict[tuple, list[Entry]] = defaultdict(list)
    for e in mine:
        by_cell[(tuple(e.facets[f] for f in rows), tuple(e.facets[f] for f in cols))].append(e)
    records = []
    for rk, ck in itertools.product(row_keys, col_keys):
        found = by_cell.get((rk, ck), [])
        if len(found) > 1:
            raise CollectError(f"{len(found)} runs for one cell ({dict(zip(rows + cols, rk + ck, strict=True))}): "
                               f"{[str(e.run) for e in found]}; add the facet that differs to --rows/--cols")
        base = {"task": task, "metric": found[0].metric if found else None,
                **dict(zip(rows, rk, strict=True)), **dict(zip(cols, ck, strict=True))}
        if not found:
            records.append({**base, "stat": "mean", "value": None, "status": MISSING})
            continue
        records += [{**base, **r, "status": "ok"} for r in cell_rows(found[0])]
    meta = {"n": sorted({len(e.ids) for e in mine}), "draws": sorted({e.draws for e in mine if e.draws > 1}),
            "seeds": sorted({(e.seeds.get("subset"), e.seeds.get("noise")) for e in mine}),
            "metric": mine[0].metric if mine else None}
    return pd.DataFrame(records), meta


def differences(entries: list[Entry], task: str) -> pd.DataFrame:
    """Paired bootstrap differences between defenses on the same samples, per model, data and strength."""
    groups: dict[tuple, dict[str, Entry]] = defaultdict(dict)
    for e in entries:
        if e.task != task:
            continue
        key = tuple(e.facets[k] for k in ("vlm", "dataset", "strength"))
        groups[key][f"{e.facets['defense']}" + (f"(tau={e.facets['tau']})" if e.facets["tau"] is not None else "")] = e
    rows = []
    for (vlm, dataset, strength), by_def in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0]))):
        for a, b in itertools.combinations(sorted(by_def), 2):
            ea, eb = by_def[a], by_def[b]
            if ea.ids != eb.ids:
                continue  # not the same samples: no paired comparison
            for stat in ("mean", "worst"):
                va, vb = bootstrap.draws_view(ea.values), bootstrap.draws_view(eb.values)
                xa, xb = va.get(stat, va["mean"]), vb.get(stat, vb["mean"])
                if stat == "worst" and "worst" not in va and "worst" not in vb:
                    continue
                est = bootstrap.paired_difference(xa, xb, ea.scale)
                rows.append({"task": task, "vlm": vlm, "dataset": dataset, "strength": strength, "stat": stat,
                             "a": a, "b": b, "a_minus_b": est.value, "ci_low": est.low, "ci_high": est.high,
                             "differ": not est.low <= 0 <= est.high, "n": len(ea.ids)})
    return pd.DataFrame(rows)


def markdown(df: pd.DataFrame, index: bool = True) -> str:
    """A GitHub Markdown table (no tabulate dependency)."""
    head = ([df.index.name or ""] if index else []) + [str(c) for c in df.columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join([" --- "] * (1 if index else 0) + [" ---: "] * len(df.columns)) + "|"]
    for key, row in df.iterrows():
        cells = ([str(key)] if index else []) + ["" if pd.isna(v) else str(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fmt_cell(group: pd.DataFrame) -> str:
    if (group["status"] == MISSING).all():
        return MISSING
    parts = []
    for _, r in group.iterrows():
        text = f"{r['value']:.1f} [{r['ci_low']:.1f}, {r['ci_high']:.1f}]"
        if r["stat"] == "mean" and pd.notna(r.get("draw_sd")):
            text += f" ±{r['draw_sd']:.1f}"
        parts.append(text if r["stat"] == "mean" else f"worst {text}")
    return " / ".join(parts)


def pivot(cells: pd.DataFrame, rows: list[str], cols: list[str]) -> pd.DataFrame:
    keyed = cells.assign(_row=cells[rows].apply(lambda r: " / ".join(label(f, v) for f, v in zip(rows, r, strict=True)), axis=1),
                         _col=cells[cols].apply(lambda r: " / ".join(label(f, v) for f, v in zip(cols, r, strict=True)), axis=1))
    order_r = list(dict.fromkeys(keyed["_row"]))
    order_c = list(dict.fromkeys(keyed["_col"]))
    text = keyed.groupby(["_row", "_col"], sort=False).apply(fmt_cell, include_groups=False)
    table = text.unstack("_col").reindex(index=order_r, columns=order_c)
    table.index.name, table.columns.name = " x ".join(rows), None
    return table


def caption(task: str, meta: dict, n_boot: int = bootstrap.N_BOOT) -> str:
    seeds = ", ".join(f"subset seed {s}, noise seed {n}" for s, n in meta["seeds"])
    draws = f"{'/'.join(map(str, meta['draws']))} purification draws per image (mean ±sd over draws; " \
            "'worst': each image's worst draw)" if meta["draws"] else "no randomized defense"
    return (f"{TASK_LABEL.get(task, task)}: {meta['metric']} on n = {'/'.join(map(str, meta['n']))} samples per cell "
            f"({seeds}); {draws}; [95 % bootstrap interval over samples, {n_boot} resamples]; "
            "clean = the clean inputs of the same runs; missing = no run.")


def write(cells: pd.DataFrame, diffs: pd.DataFrame, table: pd.DataFrame, cap: str, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    md = f"{cap}\n\n{markdown(table)}\n"
    if not diffs.empty:
        shown = diffs.assign(**{"a - b [95% CI]": diffs.apply(
            lambda r: f"{r.a_minus_b:+.1f} [{r.ci_low:+.1f}, {r.ci_high:+.1f}]" + (" *" if r.differ else ""), axis=1)})
        md += ("\nPaired bootstrap differences on the same samples (* = the interval excludes 0):\n\n"
               + shown[["vlm", "dataset", "strength", "stat", "a", "b", "a - b [95% CI]"]].pipe(markdown, index=False) + "\n")
    out.with_suffix(".md").write_text(md)
    cells.to_csv(out.with_suffix(".csv"), index=False)
    if not diffs.empty:
        diffs.to_csv(out.with_name(out.name + "_differences.csv"), index=False)
    latex = table.to_latex(escape=True, caption=cap, label=f"tab:{out.name}", column_format="l" + "r" * len(table.columns))
    out.with_suffix(".tex").write_text(latex.replace("±", r"$\pm$"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("roots", type=Path, nargs="+", help="folders searched recursively for finished runs")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--rows", default="defense,strength")
    parser.add_argument("--cols", default="dataset,vlm")
    parser.add_argument("--name", default="main", help="file prefix: <out>/<name>_<task>.{md,csv,tex}")
    args = parser.parse_args()
    rows, cols = args.rows.split(","), args.cols.split(",")
    entries = collect(args.roots)
    if not entries:
        raise CollectError(f"no finished run (summary.json) under {', '.join(map(str, args.roots))}")
    known = set(entries[0].facets)
    bad = [f for f in rows + cols if f not in known]
    if bad:
        raise CollectError(f"unknown facet(s) {bad} in --rows/--cols; choose from {sorted(known)}")
    for task in sorted({e.task for e in entries}):
        cells, meta = build(entries, task, rows, cols)
        table = pivot(cells, rows, cols)
        cap = caption(task, meta)
        write(cells, differences(entries, task), table, cap, args.out / f"{args.name}_{task}")
        print(f"{cap}\n\n{markdown(table)}\n")


if __name__ == "__main__":
    cli(main)
