"""Every config of every group composes, and the composed run config has what the runner reads."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from evaluators.config import CONFIG_DIR, validate
from evaluators.errors import ConfigError

GROUPS = ["vlm", "dataset", "attack", "defense", "logger", "paths"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def compose_run(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="run", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_config_composes(group: str, option: str):
    cfg = compose_run([f"{group}={option}"])
    assert cfg[group] is not None
    # everything but Hydra's runtime paths resolves
    OmegaConf.to_container(cfg.vlm, resolve=True)
    OmegaConf.to_container(cfg.attack, resolve=True)
    OmegaConf.to_container(cfg.defense, resolve=True)
    for task in cfg.dataset.tasks.values():
        assert "_target_" in task and "_target_" in task.source


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_composes(experiment: str):
    cfg = compose_run([f"experiment={experiment}"])
    OmegaConf.to_container(cfg.attack, resolve=True)


def test_every_dataset_has_a_denoiser_and_tasks():
    for ds in options("dataset"):
        cfg = compose_run([f"dataset={ds}"])
        assert cfg.denoiser._target_.startswith("diffcap.denoisers.")
        assert set(cfg.dataset.tasks) <= {"captioning", "vqa", "classification"}


@pytest.mark.parametrize("override,message", [
    ("defense=diffcap defense.tau=1.2", "defense.tau must be a number in (0, 1)"),
    ("defense=diffcap defense.t_max=0", "defense.t_max must be a number in (0, 1]"),
    ("attack=apgd attack.eps=300", "attack.eps must be a number in [1, 64] (in 1/255 units)"),
])
def test_out_of_range_values_fail_with_a_clear_message(override: str, message: str):
    cfg = compose_run(override.split())
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        validate(cfg)


def test_unknown_config_name_fails_with_hydras_message():
    proc = subprocess.run([sys.executable, "run.py", "vlm=nosuch"], capture_output=True, text=True,
                          cwd=CONFIG_DIR.parent, timeout=120)
    assert proc.returncode != 0
    assert "Could not find 'vlm/nosuch'" in proc.stderr


def test_cfg_job_prints_the_composed_config():
    proc = subprocess.run([sys.executable, "run.py", "--cfg", "job", "defense=diffcap"], capture_output=True,
                          text=True, cwd=CONFIG_DIR.parent, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "tau: 0.96" in proc.stdout and "name: diffcap" in proc.stdout
