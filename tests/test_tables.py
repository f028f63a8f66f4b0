"""tables.py: a real two-tau sweep becomes a table with exactly the expected cells; missing cells say so;
the bootstrap intervals behave like the textbook ones."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from evaluators import bootstrap
from evaluators.collect import CollectError, Entry, collect
from tests.test_runner import env_for, run_py

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ["-m", "experiment=embedded/tau_ablation", "n_samples=4", "batch_size=4", "defense.tau=0.9,0.96",
         "attack.eps=4", "attack.steps=2", "vlm=tiny_clip", "tasks=[classification]"]


@pytest.fixture(scope="module")
def tau_sweep(tmp_path_factory):
    from evaluators.datasets.shapes import generate_shapes

    tmp = tmp_path_factory.mktemp("tau")
    generate_shapes(tmp / "data" / "shapes", n_train=8, n_test=48, size=64, seed=0)
    sweep = tmp / "sweep"
    proc = run_py([*SWEEP, f"hydra.sweep.dir={sweep}"], env_for(tmp / "data", tmp / "cache"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return sweep


def test_two_tau_sweep_gives_exactly_the_expected_cells(tau_sweep, tmp_path):
    out = tmp_path / "tables"
    res = subprocess.run([sys.executable, "scripts/tables.py", str(tau_sweep), "--rows", "tau,strength",
                          "--cols", "dataset,vlm", "--name", "tau", "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    cells = pd.read_csv(out / "tau_classification.csv")
    got = sorted(zip(cells.tau, cells.strength, cells.stat, strict=True))
    want = sorted((tau, s, stat) for tau in (0.9, 0.96) for s in ("clean", "4/255") for stat in ("mean", "worst"))
    assert got == want
    assert (cells.status == "ok").all() and (cells.n == 4).all() and (cells.draws == 2).all()
    # every value is the run's own corpus metric, inside its interval
    for _, row in cells.iterrows():
        summary = json.loads((Path(row.run) / "summary.json").read_text())
        cond = ("clean" if row.strength == "clean" else "adv") + "_defended" + ("_worst" if row.stat == "worst" else "")
        assert row.value == pytest.approx(summary["metrics"]["classification"]["top1"][cond], abs=1e-9)
        assert row.ci_low <= row.value <= row.ci_high
    md = (out / "tau_classification.md").read_text()
    assert "n = 4 samples" in md and "subset seed 42" in md and "2 purification draws" in md
    assert (out / "tau_classification.tex").read_text().startswith("\\begin{table}")
    diffs = pd.read_csv(out / "tau_classification_differences.csv")
    assert set(zip(diffs.a, diffs.b, strict=True)) == {("diffcap(tau=0.9)", "diffcap(tau=0.96)")}


def entry(defense: str, strength: str, values, dataset: str = "shapes", tau=None) -> Entry:
    v = np.asarray(values, dtype=float)
    per = v.mean(axis=1) if v.ndim == 2 else v
    reported = {"mean": per.mean() * 100}
    if v.ndim == 2:
        reported["worst"] = v.min(axis=1).mean() * 100
    facets = {"vlm": "tiny", "dataset": dataset, "defense": defense, "tau": tau, "step": None, "t_star": None,
              "attack": "apgd", "steps": 10, "n_samples": len(v), "draws": None, "strength": strength,
              "task": "classification"}
    return Entry(facets=facets, task="classification", metric="top1", ids=[str(i) for i in range(len(v))],
                 values=v, reported=reported, scale=100.0, run=Path("/nowhere"), seeds={"subset": 42, "noise": 0},
                 draws=v.shape[1] if v.ndim == 2 else 1)


def test_missing_cells_are_marked_missing_never_zero():
    import tables

    entries = [entry("none", "clean", [1, 0, 1, 1]), entry("none", "4/255", [0, 0, 1, 0]),
               entry("diffpure", "4/255", [[1, 0], [1, 1], [0, 0], [1, 1]], dataset="other")]
    cells, meta = tables.build(entries, "classification", ["defense", "strength"], ["dataset", "vlm"])
    missing = cells[cells.status == "missing"]
    # 2 defenses x 2 strengths x 2 data sets = 8 cells, 3 with runs
    assert len(missing) == 5 and missing.value.isna().all()
    table = tables.pivot(cells, ["defense", "strength"], ["dataset", "vlm"])
    assert table.loc["DiffPure / clean", "shapes / tiny"] == "missing"
    assert "worst" in table.loc["DiffPure / 4/255", "other / tiny"]
    assert meta["n"] == [4] and meta["draws"] == [2]
    # two runs for one cell is an error, not a silent pick
    with pytest.raises(CollectError, match="2 runs for one cell"):
        tables.build(entries + [entry("none", "clean", [1, 1, 1, 1])], "classification", ["defense", "strength"],
                     ["dataset", "vlm"])


def test_bootstrap_interval_matches_the_normal_approximation():
    rng = np.random.default_rng(1)
    x = (rng.random(500) < 0.7).astype(float)
    est = bootstrap.interval(x, 100.0)
    half = 1.96 * np.sqrt(x.mean() * (1 - x.mean()) / len(x)) * 100
    assert est.value == pytest.approx(x.mean() * 100)
    assert (est.high - est.low) / 2 == pytest.approx(half, rel=0.15)
    # paired: a constant shift has a zero-width interval; independent noise of the same samples does not
    d = bootstrap.paired_difference(x + 0.1, x, 100.0)
    assert d.value == pytest.approx(10.0) and d.low == pytest.approx(10.0) and d.high == pytest.approx(10.0)
    assert bootstrap.draw_spread(np.stack([x, 1 - x], axis=1), 100.0) > 0
    assert bootstrap.draw_spread(x) is None


def test_collect_refuses_per_sample_values_that_do_not_reproduce_the_run(tau_sweep, tmp_path):
    import shutil

    run = next(p.parent for p in sorted(tau_sweep.rglob("summary.json")))
    bad = tmp_path / "bad"
    shutil.copytree(run, bad)
    s = json.loads((bad / "summary.json").read_text())
    s["metrics"]["classification"]["top1"]["adv_defended"] += 5.0
    (bad / "summary.json").write_text(json.dumps(s))
    with pytest.raises(CollectError, match="do not reproduce"):
        collect([bad])
