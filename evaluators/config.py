"""OmegaConf resolvers and config checks shared by run.py, the scripts and the tests."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from evaluators.errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = PROJECT_ROOT / "configs"


def register_resolvers() -> None:
    """``${eps255:4}`` -> 4/255 (configs write eps in 1/255 units); ``${project_root:}``."""
    if not OmegaConf.has_resolver("eps255"):
        OmegaConf.register_new_resolver("eps255", lambda v: float(v) / 255.0)
    if not OmegaConf.has_resolver("project_root"):
        OmegaConf.register_new_resolver("project_root", lambda: os.environ.get("DIFFCAP_ROOT", str(PROJECT_ROOT)))


def compose_config(overrides: list[str], output_dir: str | Path | None = None) -> DictConfig:
    """The run config for ``overrides`` outside ``python run.py`` (scripts, notebooks), with
    ``paths.output_dir`` set since Hydra's runtime is absent."""
    from hydra import compose, initialize_config_dir

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="run", overrides=list(overrides))
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir or PROJECT_ROOT / "results" / "scratch")
    return cfg


def validate(cfg: DictConfig) -> None:
    """Range checks that must fail before any work starts, each with a one-line message."""
    for group in ("vlm", "dataset", "attack", "defense"):
        reason = cfg[group].get("unavailable")
        if reason:
            raise ConfigError(f"{group}={cfg[group].name} is not available yet: {reason}")
    from attacks.config import validate_attack

    validate_attack(cfg.attack)
    eps = cfg.attack.get("eps")
    if eps is not None and not 0 < float(eps) <= 64:
        raise ConfigError(f"attack.eps is in 1/255 units and must be in (0, 64], got {eps}")
    tau = cfg.defense.get("tau")
    if tau is not None and not 0 < float(tau) < 1:
        raise ConfigError(f"defense.tau must be in (0, 1), got {tau}")
    for key in ("t_max", "t_star"):
        v = cfg.defense.get(key)
        if v is not None and not 0 < float(v) <= 1:
            raise ConfigError(f"defense.{key} must be in (0, 1], got {v}")
    draws = cfg.defense.get("eval_draws", 1)
    if int(draws) < 1:
        raise ConfigError(f"defense.eval_draws must be >= 1, got {draws}")
    if int(cfg.batch_size) < 1 or int(cfg.n_samples) < 1:
        raise ConfigError("batch_size and n_samples must be >= 1")
