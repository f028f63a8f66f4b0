"""Experiment configs and launchers: every paper table has an embedded twin with the same grid; a joblib
sweep runs with one failing job recorded; Slurm composes; wandb groups a multirun offline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from evaluators.config import CONFIG_DIR, register_resolvers
from tests.test_runner import env_for, run_py

ROOT = Path(__file__).resolve().parents[1]
TABLES = ("captioning", "vqa", "zero_shot", "tau_ablation", "step_ablation", "runtime")
GRID = {"defense": "none,diffpure,diffcap", "attack.eps": "2,4"}


def composed(experiment: str, *overrides: str):
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="run", overrides=[f"experiment={experiment}", *overrides],
                       return_hydra_config=True)


@pytest.mark.parametrize("name", TABLES)
def test_every_paper_experiment_has_an_embedded_twin_with_the_same_grid(name):
    paper, embedded = composed(f"paper/{name}"), composed(f"embedded/{name}")
    pp, ep = dict(paper.hydra.sweeper.params), dict(embedded.hydra.sweeper.params)
    assert pp["attack.eps"] == ep["attack.eps"] == "2,4"
    if name in ("captioning", "vqa", "zero_shot", "runtime"):
        assert pp["defense"] == ep["defense"] == GRID["defense"]
    if name == "tau_ablation":
        assert [float(t) for t in pp["defense.tau"].split(",")] == [0.90, 0.92, 0.94, 0.96, 0.98]
        assert pp["defense.tau"] == ep["defense.tau"]
    if name == "step_ablation":
        assert pp["defense.step"] == ep["defense.step"]
    assert paper.tasks == embedded.tasks
    real = {paper.vlm.name} | set(pp.get("vlm", "").split(",")) - {""}
    assert real <= {"llava", "openflamingo", "clip"}
    assert embedded.vlm.name in ("tiny_llava", "tiny_clip") and embedded.dataset.name == "shapes" and embedded.device == "cpu"
    assert str(paper.hydra.sweep.dir).endswith(f"paper/{name}")
    assert str(embedded.hydra.sweep.dir).endswith(f"embedded/{name}")


def test_embedded_purifiers_use_the_stated_ddim_budget():
    for defense in ("diffpure", "diffcap", "none"):
        cfg = composed("embedded/captioning", f"defense={defense}")
        assert cfg.n_samples == 16 and cfg.attack.steps == 10 and cfg.defense.eval_draws == 2
        if defense != "none":
            assert cfg.defense.purifier.sampler._target_ == "diffcap.samplers.DDIM"
            assert cfg.defense.purifier.sampler.steps == 10


def test_slurm_launcher_composes_with_cluster_values():
    cfg = composed("paper/captioning", "hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu",
                   "hydra.launcher.timeout_min=600", "hydra.launcher.mem_gb=80")
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.partition, launcher.timeout_min, launcher.gpus_per_node, launcher.mem_gb) == ("gpu", 600, 1, 80)
    from hydra.utils import get_class

    get_class(launcher._target_)  # the plugin is installed
    res = subprocess.run([sys.executable, "run.py", "experiment=paper/captioning", "hydra/launcher=submitit_slurm",
                          "--cfg", "hydra", "-p", "hydra.launcher"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "SlurmLauncher" in res.stdout and "gpus_per_node: 1" in res.stdout


def test_joblib_sweep_records_a_failing_job_and_completes_the_others(tmp_path):
    """The embedded tau ablation through joblib (shrunk), with one impossible tau; logged offline to wandb."""
    from evaluators.datasets.shapes import generate_shapes

    generate_shapes(tmp_path / "data" / "shapes", n_train=8, n_test=48, size=64, seed=0)
    sweep = tmp_path / "sweep"
    env = env_for(tmp_path / "data", tmp_path / "cache", WANDB_MODE="offline")
    proc = run_py(["-m", "experiment=embedded/tau_ablation", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                   "n_samples=2", "batch_size=2", "attack.eps=4", "attack.steps=2", "defense.tau=0.9,1.5",
                   "vlm=tiny_clip", "tasks=[classification]", "logger=wandb", f"hydra.sweep.dir={sweep}"], env)
    assert proc.returncode == 1, proc.stderr[-3000:]
    statuses = {str(p.parent.relative_to(sweep)): json.loads(p.read_text()) for p in sweep.rglob("job_status.json")}
    assert len(statuses) == 2
    ok = [d for d, s in statuses.items() if s["status"] == "ok"]
    bad = [s for s in statuses.values() if s["status"] == "error"]
    assert len(ok) == 1 and "defense.tau=0.9" in ok[0]
    assert len(bad) == 1 and bad[0]["error"] == "defense.tau=1.5 is not accepted: defense.tau must be a number in (0, 1)"
    assert "1 of 2 jobs failed" in proc.stderr and "Traceback" not in proc.stderr
    done = next(p.parent for p in sweep.rglob("summary.json"))
    assert json.loads((done / "summary.json").read_text())["metrics"]["classification"]["top1"]
    # wandb: offline, one group per multirun (the sweep folder), metrics and the stopping-time histogram
    runs = list(done.rglob("*.wandb"))
    assert len(runs) == 1
    blob = runs[0].read_bytes()
    assert str(sweep).encode() in blob
    assert b"classification/stopping_time/adv_defended" in blob and b"classification/top1/clean" in blob


@pytest.mark.parametrize("dataset", ["shapes", "coco", "flickr30k", "vqav2", "textvqa", "caltech101", "imagenet"])
def test_every_dataset_gives_diffcap_a_fixed_clip_encoder(dataset):
    """defense.encoder=clip works on every data set: the shapes world's tiny CLIP, CLIP ViT-B/32 elsewhere."""
    from evaluators.config import compose_config, validate

    vlm = "vlm=clip" if dataset in ("caltech101", "imagenet") else "vlm=llava"
    cfg = compose_config([f"dataset={dataset}", vlm, "defense=diffcap", "defense.encoder=clip"])
    validate(cfg)
    enc = cfg.dataset.fixed_encoder
    assert enc._target_ == "evaluators.vlms.clip.CLIPVLM.load"
    if dataset == "shapes":
        from hydra.utils import instantiate

        assert enc.path.endswith("checkpoints/tiny_clip_hf") and enc.resolution == 56
        encoder = instantiate(enc)
        import torch

        z = encoder.embed(torch.rand(2, 3, 56, 56))
        torch.testing.assert_close(z.norm(dim=-1), torch.ones(2))
    else:
        assert enc.resolution == 224 and "clip-vit-base-patch32" in str(enc.path)


def test_sweep_report_leaves_out_another_sweep_running_in_a_subfolder(tmp_path, capsys):
    """A sweep's report lists its own jobs only, not those of a sweep writing into a subfolder meanwhile."""
    from omegaconf import OmegaConf

    from evaluators.jobs import STATUS, SweepReport

    root = tmp_path / "multiruns"
    report = SweepReport()
    report.on_multirun_start(OmegaConf.create({}))
    for job, sweep, status in (("mine", root, "ok"), ("sub/theirs", root / "sub", "error")):
        (root / job).mkdir(parents=True)
        (root / job / STATUS).write_text(json.dumps({"status": status, "error": "x", "sweep_dir": str(sweep)}))
    report.on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(root)}}}))  # no SystemExit: theirs failed
    (root / "sub" / "theirs" / STATUS).write_text(json.dumps({"status": "error", "error": "x", "sweep_dir": str(root)}))
    with pytest.raises(SystemExit):
        report.on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(root)}}}))
    assert "job sub/theirs failed" in capsys.readouterr().err
