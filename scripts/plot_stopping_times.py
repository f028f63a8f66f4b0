"""Box plot of DiffCAP's per-image stopping times (clean and attacked inputs) against DiffPure's fixed t*.

    python scripts/plot_stopping_times.py results/multiruns --out results/stopping_times.png
Reads every run folder under ROOT whose defense is diffcap or diffpure.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from evaluators import results  # noqa: E402
from evaluators.errors import HarnessError, cli  # noqa: E402
from evaluators.run_folder import RUN_CONFIG, read_run_config  # noqa: E402


def collect(root: Path) -> tuple[dict[str, list[float]], list[float]]:
    """Stopping times by label ("tau=0.96 clean", ...) for DiffCAP runs, and the t* of DiffPure runs."""
    times: dict[str, list[float]] = {}
    t_stars: list[float] = []
    if not root.is_dir():
        raise HarnessError(f"{root} is not a folder; pass the folder that holds the run folders")
    for cfg_path in sorted(root.rglob(RUN_CONFIG)):
        cfg = read_run_config(cfg_path.parent)
        defense = cfg.get("defense") or {}
        if defense.get("name") == "diffpure":
            t_stars.append(float(defense["t_star"]))
            continue
        if defense.get("name") != "diffcap":
            continue
        for rec in results.read_records(cfg_path.parent / results.SAMPLES):
            for cond, draws in (rec.get("defense") or {}).items():
                label = f"tau={defense.get('tau')} {cond.replace('_defended', '')} ({rec['task']})"
                times.setdefault(label, []).extend(d["t"] for d in draws if isinstance(d, dict) and "t" in d)
    return times, sorted(set(t_stars))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path)
    parser.add_argument("--out", type=Path, default=Path("results/stopping_times.png"))
    args = parser.parse_args()
    times, t_stars = collect(args.root)
    if not times:
        raise HarnessError(f"no DiffCAP runs with samples under {args.root}; run defense=diffcap first")
    labels = sorted(times)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(labels)), 4.5))
    ax.boxplot([times[k] for k in labels], showmeans=True)
    ax.set_xticks(range(1, len(labels) + 1), labels, rotation=30, ha="right", fontsize=8)
    for t in t_stars or [0.15]:
        ax.axhline(t, color="tab:red", ls="--", lw=1)
        ax.text(0.6, t, f" DiffPure t*={t:g}", color="tab:red", va="bottom", fontsize=8)
    ax.set_ylabel("diffusion time reached before the reverse pass")
    ax.set_title("DiffCAP per-image stopping time vs DiffPure's fixed t*")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    cli(main)
