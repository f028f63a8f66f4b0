"""End to end through ``python run.py``: records, summary, multirun, resume after SIGKILL, re-scoring, bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMALL_WORLD = ["dataset.prepare.n_train=8", "dataset.prepare.n_test=48"]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A small shapes world shared by the tests (generated through the same code as the default run)."""
    from evaluators.datasets.shapes import generate_shapes

    d = tmp_path_factory.mktemp("data")
    generate_shapes(d / "shapes", n_train=8, n_test=48, size=64, seed=0)
    return d


def env_for(data_dir: Path, cache: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ, DIFFCAP_DATA=str(data_dir), DIFFCAP_CACHE=str(cache), HF_HUB_OFFLINE="1",
               WANDB_MODE="disabled", OMP_NUM_THREADS="2")
    env.update(extra)
    return env


def run_py(args: list[str], env: dict[str, str], timeout: int = 300, shapes: bool = True) -> subprocess.CompletedProcess:
    world = SMALL_WORLD if shapes else []
    return subprocess.run([sys.executable, "run.py", *args, *world], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]


def test_fast_dev_run_writes_records_summary_and_manifests(data_dir, tmp_path):
    out = tmp_path / "run"
    proc = run_py(["experiment=fast_dev", f"hydra.run.dir={out}"], env_for(data_dir, tmp_path / "cache"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["metrics"]) == {"captioning", "vqa"}  # every task the default VLM (tiny LLaVA) can do
    assert summary["metrics"]["captioning"]["cider"]["clean"] >= 0
    assert 0 <= summary["metrics"]["vqa"]["vqa_acc"]["clean"] <= 100
    assert summary["seeds"] == {"subset": 42, "noise": 0}
    assert summary["environment"]["packages"]["torch"]
    recs = records(out)
    assert len(recs) == 2 * 8
    assert {r["task"] for r in recs} == {"captioning", "vqa"}
    for task in ("captioning", "vqa"):
        manifest = json.loads((out / f"manifest_{task}.json").read_text())
        assert sorted(manifest["ids"]) == sorted(r["id"] for r in recs if r["task"] == task)
    assert "clean" in proc.stdout  # the table


def test_rescore_reproduces_the_summary(data_dir, tmp_path):
    out = tmp_path / "run"
    proc = run_py(["experiment=fast_dev", "tasks=[captioning,vqa]", f"hydra.run.dir={out}"],
                  env_for(data_dir, tmp_path / "cache"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    before = json.loads((out / "summary.json").read_text())["metrics"]
    (out / "summary.json").unlink()
    res = subprocess.run([sys.executable, "scripts/rescore.py", str(out)], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env=env_for(data_dir, tmp_path / "cache"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["metrics"] == before


def test_multirun_sweeps_defenses(data_dir, tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_py(["-m", "experiment=fast_dev", "vlm=tiny_clip", "tasks=[classification]", "defense=none,diffcap",
                   "defense.eval_draws=1", f"hydra.sweep.dir={sweep}"], env_for(data_dir, tmp_path / "cache"), 600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = sorted(sweep.rglob("summary.json"))
    assert len(summaries) == 2
    names = {json.loads(p.read_text())["config"]["defense"]["name"] for p in summaries}
    assert names == {"none", "diffcap"}


def test_resume_after_sigkill_gives_the_same_metrics(data_dir, tmp_path):
    args = ["vlm=tiny_clip", "tasks=[classification]", "attack=apgd", "attack.steps=10", "n_samples=40", "batch_size=4",
            "attack.zero_shot.ce_restarts=2", "attack.zero_shot.target_classes=1"]  # random starts, APGD-T
    ref = tmp_path / "reference"
    proc = run_py([*args, f"hydra.run.dir={ref}"], env_for(data_dir, tmp_path / "cache_ref"))
    assert proc.returncode == 0, proc.stderr[-3000:]

    out = tmp_path / "killed"
    env = env_for(data_dir, tmp_path / "cache_killed")
    p = subprocess.Popen([sys.executable, "run.py", *args, *SMALL_WORLD, f"hydra.run.dir={out}"], cwd=ROOT, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    samples = out / "samples.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and p.poll() is None:
        if samples.exists() and samples.read_text().count("\n") >= 4:
            break
        time.sleep(0.01)
    assert p.poll() is None, "the run finished before it could be killed; make it longer"
    p.send_signal(signal.SIGKILL)
    p.wait()
    with samples.open("a") as f:  # a torn line, as if the kill had landed mid-write
        f.write('{"task": "classification", "batch": 9, "id"')
    n_before = len([line for line in samples.read_text().splitlines() if line.endswith("}")])
    assert 4 <= n_before < 40

    proc = run_py([*args, f"hydra.run.dir={out}"], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming" in proc.stdout + proc.stderr
    recs = records(out)
    assert len(recs) == 40 and len({r["id"] for r in recs}) == 40
    got = json.loads((out / "summary.json").read_text())
    want = json.loads((ref / "summary.json").read_text())
    assert got["metrics"] == want["metrics"]
    assert got["attack"]["classification"]["all_invariants_ok"]


def test_resume_with_another_config_is_refused(data_dir, tmp_path):
    out = tmp_path / "run"
    env = env_for(data_dir, tmp_path / "cache")
    assert run_py(["experiment=fast_dev", "tasks=[vqa]", f"hydra.run.dir={out}"], env).returncode == 0
    proc = run_py(["experiment=fast_dev", "tasks=[vqa]", "seed.subset=1", f"hydra.run.dir={out}"], env)
    assert proc.returncode == 2
    assert "different config (differs in seed.subset)" in proc.stderr


def last_error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def test_missing_data_folder(tmp_path):
    proc = run_py(["dataset=coco", "vlm=tiny_llava", f"hydra.run.dir={tmp_path / 'run'}"],
                  env_for(tmp_path / "nodata", tmp_path / "cache"), shapes=False)
    assert proc.returncode == 2
    assert "dataset_coco.json" in last_error_line(proc)


def test_missing_checkpoint(data_dir, tmp_path):
    proc = run_py(["experiment=fast_dev", f"vlm.path={tmp_path / 'nothing'}", f"hydra.run.dir={tmp_path / 'r'}"],
                  env_for(data_dir, tmp_path / "cache"))
    assert proc.returncode == 2
    assert str(tmp_path / "nothing") in last_error_line(proc)


def test_missing_java(data_dir, tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    os.symlink(sys.executable, bindir / "python")
    proc = run_py(["experiment=fast_dev", f"hydra.run.dir={tmp_path / 'r'}"],
                  env_for(data_dir, tmp_path / "cache", PATH=str(bindir)))
    assert proc.returncode == 2
    assert "Java" in last_error_line(proc)


def test_corrupt_image_is_skipped_and_recorded(data_dir, tmp_path):
    world = tmp_path / "data"
    shutil.copytree(data_dir, world)
    out = tmp_path / "run"
    env = env_for(world, tmp_path / "cache")
    # find the first evaluated classification sample and corrupt its file
    proc = run_py(["experiment=fast_dev", "vlm=tiny_clip", "tasks=[classification]", f"hydra.run.dir={tmp_path / 'probe'}"], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest_ids = json.loads((tmp_path / "probe" / "manifest_classification.json").read_text())["ids"]
    victim = world / "shapes" / "classes" / "test" / f"{manifest_ids[0]}.png"
    assert victim.exists()
    victim.write_bytes(b"not a png at all")
    proc = run_py(["experiment=fast_dev", "vlm=tiny_clip", "tasks=[classification]", f"hydra.run.dir={out}"], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples"]["classification"]["errors"] == 1
    assert summary["samples"]["classification"]["error_ids"] == [manifest_ids[0]]
    assert summary["samples"]["classification"]["evaluated"] == 7
