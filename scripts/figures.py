"""The paper's figures from finished runs (PNG and PDF): tau ablation, stopping-time distribution, runtime per
image per defense, and an example grid (clean, attacked, purified images with their predictions).

    python scripts/figures.py --main results/multiruns/embedded/{captioning,vqa,zero_shot} \
        --tau results/multiruns/embedded/tau_ablation --runtime results/multiruns/embedded/runtime \
        --out results/embedded/figures

Each figure is drawn from the runs that hold its data and skipped (with a note) when there are none.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from PIL import Image

from evaluators import bootstrap, results
from evaluators.collect import DEFENSE_LABEL, DEFENSE_ORDER, TASK_LABEL, CollectError, Entry, collect
from evaluators.errors import cli


def save(fig: plt.Figure, out: Path) -> list[Path]:
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    paths = [out.with_suffix(".png"), out.with_suffix(".pdf")]
    fig.savefig(paths[0], dpi=130)
    fig.savefig(paths[1])
    plt.close(fig)
    return paths


def tau_ablation(entries: list[Entry], out: Path) -> list[Path]:
    """Metric (mean over draws, 95 % interval) and purification seconds per image against tau, per strength."""
    cap = [e for e in entries if e.facets["defense"] == "diffcap" and e.facets["tau"] is not None]
    taus = sorted({e.facets["tau"] for e in cap})
    if len(taus) < 2:
        return []
    task = sorted({e.task for e in cap})[0]
    cap = [e for e in cap if e.task == task]
    fig, (ax_m, ax_t) = plt.subplots(1, 2, figsize=(10, 4))
    by_strength: dict[str, list[Entry]] = defaultdict(list)
    for e in cap:
        by_strength[e.facets["strength"]].append(e)
    for strength, es in sorted(by_strength.items(), key=lambda kv: (kv[0] != "clean", kv[0])):
        es = sorted(es, key=lambda e: e.facets["tau"])
        x = [e.facets["tau"] for e in es]
        est = [bootstrap.interval(bootstrap.draws_view(e.values)["mean"], e.scale) for e in es]
        y = [e.reported["mean"] for e in es]
        ax_m.errorbar(x, y, yerr=[[v - s.low for v, s in zip(y, est, strict=True)],
                                  [s.high - v for v, s in zip(y, est, strict=True)]], marker="o", capsize=3, label=strength)
        ax_t.plot(x, [np.mean(e.purify_seconds) if e.purify_seconds else np.nan for e in es], marker="o", label=strength)
    ax_m.set(xlabel="tau", ylabel=f"{cap[0].metric} (DiffCAP, mean over draws)", title=TASK_LABEL.get(task, task))
    ax_t.set(xlabel="tau", ylabel="purification seconds per image", title="DiffCAP runtime")
    for ax in (ax_m, ax_t):
        ax.legend(title="inputs", fontsize=8)
        ax.grid(alpha=0.3)
    return save(fig, out)


def stopping_times(entries: list[Entry], out: Path) -> list[Path]:
    """DiffCAP's per-image stopping times (box plots) against DiffPure's fixed t* (dashed line)."""
    cap = [e for e in entries if e.facets["defense"] == "diffcap" and e.stopping_t]
    if not cap:
        return []
    groups: dict[str, list[float]] = defaultdict(list)
    for e in sorted(cap, key=lambda e: (e.task, e.facets["tau"], e.facets["strength"] != "clean", e.facets["strength"])):
        groups[f"{e.task}\ntau={e.facets['tau']:g} {e.facets['strength']}"].extend(e.stopping_t)
    t_stars = sorted({e.facets["t_star"] for e in entries if e.facets["defense"] == "diffpure"})
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(groups)), 4.5))
    ax.boxplot(list(groups.values()), showmeans=True)
    ax.set_xticks(range(1, len(groups) + 1), list(groups), rotation=45, ha="right", fontsize=7)
    for t in t_stars:
        ax.axhline(t, color="tab:red", ls="--", lw=1)
        ax.text(0.55, t, f" DiffPure t* = {t:g}", color="tab:red", va="bottom", fontsize=8)
    ax.set_ylabel("diffusion time before the reverse pass")
    ax.set_title("DiffCAP per-image stopping time vs DiffPure's fixed t*")
    return save(fig, out)


def runtime(entries: list[Entry], out: Path) -> list[Path]:
    """Purification seconds per image and draw (mean, with the 10-90 % range) per defense, clean and attacked."""
    rows: dict[tuple[str, str], list[float]] = defaultdict(list)
    evals: dict[str, list[float]] = defaultdict(list)
    for e in entries:
        if e.facets["defense"] == "none" or not e.purify_seconds:
            continue
        kind = "clean" if e.facets["strength"] == "clean" else "attacked"
        rows[(e.facets["defense"], kind)].extend(e.purify_seconds)
        evals[e.facets["defense"]].extend(e.denoiser_evals)
    if not rows:
        return []
    defenses = [d for d in DEFENSE_ORDER if any(k[0] == d for k in rows)]
    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.38
    for j, kind in enumerate(("clean", "attacked")):
        xs = np.arange(len(defenses)) + (j - 0.5) * width
        vals = [rows.get((d, kind), []) for d in defenses]
        mean = [np.mean(v) if v else np.nan for v in vals]
        lo = [m - np.quantile(v, 0.1) if v else 0 for m, v in zip(mean, vals, strict=True)]
        hi = [np.quantile(v, 0.9) - m if v else 0 for m, v in zip(mean, vals, strict=True)]
        ax.bar(xs, mean, width, yerr=[lo, hi], capsize=3, label=kind)
    ax.set_xticks(range(len(defenses)),
                  [f"{DEFENSE_LABEL[d]}\n{np.mean(evals[d]):.0f} denoiser calls" for d in defenses])
    ax.set_ylabel("purification seconds per image")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("Runtime per image (mean, 10-90 % range)")
    return save(fig, out)


def _tiles(png: Path, n: int) -> list[np.ndarray]:
    """The n images of a saved example strip (torchvision's save_image, padding 1)."""
    a = np.asarray(Image.open(png).convert("RGB"))
    size = (a.shape[1] - 1) // n - 1
    return [a[1 : 1 + size, 1 + k * (size + 1) : 1 + k * (size + 1) + size] for k in range(n)]


def _short(pred) -> str:
    text = pred[0] if isinstance(pred, list) else pred
    text = str(text)
    return text if len(text) <= 22 else text[:21] + "…"


def example_grid(entries: list[Entry], out: Path, n: int = 4) -> list[Path]:
    """Clean, attacked and purified images (first batch of one task at the largest eps) with predictions."""
    attacked = [e for e in entries if e.facets["strength"] != "clean" and (e.run / "examples").exists()]
    if not attacked:
        return []
    task = "captioning" if any(e.task == "captioning" for e in attacked) else attacked[0].task
    strongest = max({e.facets["strength"] for e in attacked if e.task == task})
    picks = {e.facets["defense"]: e for e in attacked if e.task == task and e.facets["strength"] == strongest}
    rows = []  # (label, images, predictions)
    base = picks.get("none") or next(iter(picks.values()))
    recs = [r for r in results.read_records(base.run / results.SAMPLES) if r["task"] == task and r["status"] == "ok"][:n]
    for cond, lab in (("clean", "clean"), ("adv", f"attacked {strongest}")):
        rows.append((lab, _tiles(base.run / "examples" / f"{task}_{cond}.png", len(recs)),
                     [r["predictions"][cond] for r in recs]))
    for d in ("diffpure", "diffcap"):
        e = picks.get(d)
        if e is None or not (e.run / "examples" / f"{task}_adv_defended.png").exists():
            continue
        rec_d = [r for r in results.read_records(e.run / results.SAMPLES) if r["task"] == task and r["status"] == "ok"][:n]
        rows.append((f"attacked + {DEFENSE_LABEL[d]}", _tiles(e.run / "examples" / f"{task}_adv_defended.png", len(rec_d)),
                     [r["predictions"]["adv_defended"] for r in rec_d]))
    fig, axes = plt.subplots(len(rows), len(recs), figsize=(2.3 * len(recs), 2.4 * len(rows)), squeeze=False)
    for i, (lab, tiles, preds) in enumerate(rows):
        for k, (tile, pred) in enumerate(zip(tiles, preds, strict=True)):
            ax = axes[i][k]
            ax.imshow(tile)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(_short(pred), fontsize=7)
            if k == 0:
                ax.set_ylabel(lab, fontsize=8)
    fig.suptitle(f"{TASK_LABEL.get(task, task)}: first images of the run (predictions above; purified: draw 0)", fontsize=9)
    return save(fig, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--main", type=Path, nargs="+", default=[], help="main-grid runs: stopping times, examples")
    parser.add_argument("--tau", type=Path, nargs="+", default=[], help="tau-ablation runs")
    parser.add_argument("--runtime", type=Path, nargs="+", default=[], help="runtime runs")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if not (args.main or args.tau or args.runtime):
        raise CollectError("pass run folders with --main, --tau and/or --runtime")
    groups = {k: collect(v) if v else [] for k, v in (("main", args.main), ("tau", args.tau), ("runtime", args.runtime))}
    made = {}
    for name, fn, group in (("tau_ablation", tau_ablation, "tau"), ("stopping_times", stopping_times, "main"),
                            ("runtime", runtime, "runtime"), ("examples", example_grid, "main")):
        made[name] = [str(p) for p in fn(groups[group], args.out / name)]
        print(f"{name}: {', '.join(made[name]) or 'skipped (no runs with its data)'}")
    if not any(made.values()):
        raise CollectError(f"no figure could be drawn: no DiffCAP runs (stopping times), no tau sweep and no "
                           f"runtime runs with a defense under {', '.join(map(str, args.main + args.tau + args.runtime))}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "figures.json").write_text(json.dumps(made, indent=2) + "\n")


if __name__ == "__main__":
    cli(main)
