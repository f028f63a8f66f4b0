"""OmegaConf resolvers and the config checks shared by run.py, the scripts and the tests.

``validate`` checks every value's type, range and enumeration, and the combinations of groups, before anything
heavy (data, models, Java) is touched; each failure is one line naming the key and the accepted values.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from evaluators.errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = PROJECT_ROOT / "configs"


def register_resolvers() -> None:
    """``${eps255:4}`` -> 4/255 (configs write eps in 1/255 units); ``${project_root:}``."""
    if not OmegaConf.has_resolver("eps255"):
        OmegaConf.register_new_resolver("eps255", lambda v: float(v) / 255.0)
    if not OmegaConf.has_resolver("project_root"):
        OmegaConf.register_new_resolver("project_root", lambda: os.environ.get("DIFFCAP_ROOT", str(PROJECT_ROOT)))


def compose_config(overrides: Sequence[str], output_dir: str | Path | None = None, check: bool = True,
                   model: bool = True) -> DictConfig:
    """The run config for ``overrides`` outside ``python run.py`` (scripts, notebooks), with ``paths.output_dir``
    set since Hydra's runtime is absent. A bad override or value is a ``ConfigError``. ``model=False``: for
    scripts that load no model (data preparation), the VLM's tasks are not matched against the data set's."""
    from hydra import compose, initialize_config_dir

    register_resolvers()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose(config_name="run", overrides=list(overrides))
    except ConfigError:
        raise
    except Exception as e:  # Hydra's override parser and config loader raise several unrelated types
        raise ConfigError(f"bad override: {_chain(e)}") from e
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir or PROJECT_ROOT / "results" / "scratch")
    if check:
        validate(cfg, model=model)
    return cfg


def _chain(exc: BaseException) -> str:
    """The messages of an exception and its causes (Hydra wraps the one that names the problem)."""
    from evaluators.errors import one_line

    parts: list[str] = []
    while exc is not None and len(parts) < 4:
        text = one_line(exc)
        if text and text != "None" and not any(text in p for p in parts):
            parts.append(text)
        exc = exc.__cause__ or exc.__context__
    return ": ".join(parts)


# --------------------------------------------------------------------------------------------- value checks


@dataclass(frozen=True)
class Check:
    """What one key accepts: an integer, a number or a bool in a range, or one of a few strings."""

    kind: str  # "int", "num", "bool", "enum"
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    choices: tuple[str, ...] = ()
    optional: bool = False
    unit: str = ""

    def ok(self, v: Any) -> bool:
        if v is None:
            return self.optional
        if self.kind == "bool":
            return isinstance(v, bool)
        if self.kind == "enum":
            return isinstance(v, str) and v in self.choices
        if isinstance(v, bool) or not isinstance(v, int | float) or (self.kind == "int" and not isinstance(v, int)):
            return False
        if v != v or v in (float("inf"), float("-inf")):
            return False
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return not (self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi))

    def accepted(self) -> str:
        if self.kind == "bool":
            text = "true or false"
        elif self.kind == "enum":
            text = "one of " + ", ".join(self.choices)
        else:
            text = "an integer" if self.kind == "int" else "a number"
            if self.lo is not None and self.hi is not None:
                text += f" in {'(' if self.lo_open else '['}{_n(self.lo)}, {_n(self.hi)}{')' if self.hi_open else ']'}"
            elif self.lo is not None:
                text += f" {'>' if self.lo_open else '>='} {_n(self.lo)}"
        return text + (f" ({self.unit})" if self.unit else "") + (" (or null)" if self.optional else "")


def _n(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


POSITIVE_INT = Check("int", lo=1)
UNIT_OPEN = Check("num", lo=0, hi=1, lo_open=True, hi_open=True)
UNIT_HALF_OPEN = Check("num", lo=0, hi=1, lo_open=True)
BOOL = Check("bool")

#: every value a run reads, checked when its group is selected (a key absent from the config is skipped)
CHECKS: dict[str, Check] = {
    "n_samples": Check("int", lo=1, optional=True),  # null: the whole split
    "batch_size": POSITIVE_INT, "torch_threads": Check("int", lo=1, optional=True),
    "seed.subset": Check("int", lo=0), "seed.noise": Check("int", lo=0), "resume": BOOL,
    "harness_version": POSITIVE_INT,
    "attack.eps": Check("num", lo=1, hi=64, unit="in 1/255 units"), "attack.steps": POSITIVE_INT,
    "attack.eot_iter": POSITIVE_INT, "attack.eval_draws": Check("int", lo=1, optional=True),
    "attack.schedule": Check("enum", choices=("single", "ensemble")),
    "attack.precision": Check("enum", choices=("float32", "float16", "bfloat16")),
    "attack.adaptive": BOOL, "attack.from_cache": BOOL,
    "attack.method.apgd.initial_step": Check("num", lo=0, lo_open=True),
    "attack.method.apgd.step_weight": UNIT_HALF_OPEN, "attack.method.apgd.rho": UNIT_OPEN,
    "attack.method.apgd.random_start": BOOL,
    "defense.tau": UNIT_OPEN, "defense.encoder": Check("enum", choices=("vlm", "clip")),
    "defense.keep": Check("enum", choices=("before", "after")), "defense.step": POSITIVE_INT,
    "defense.t_max": UNIT_HALF_OPEN, "defense.t_star": UNIT_HALF_OPEN, "defense.check_every": POSITIVE_INT,
    "defense.eval_draws": POSITIVE_INT, "defense.sampler.steps": POSITIVE_INT, "defense.sampler.dt": UNIT_OPEN,
    "defense.sampler.eta": Check("num", lo=0), "defense.antialias": BOOL, "defense.sampler.clip_denoised": BOOL,
    "dataset.prepare.n_train": POSITIVE_INT, "dataset.prepare.n_test": POSITIVE_INT,
    "dataset.prepare.size": Check("int", lo=8), "dataset.prepare.seed": Check("int", lo=0),
    "logger.mode": Check("enum", choices=("online", "offline", "disabled")), "logger.n_images": Check("int", lo=0),
    # speed options (README "Performance")
    "denoiser.autocast": Check("enum", choices=("bfloat16", "float16"), optional=True),
    "denoiser.channels_last": BOOL, "denoiser.compile": BOOL, "denoiser.attention": Check("enum", choices=("einsum", "sdpa")),
    "defense.inference_mode": BOOL, "defense.encoder_autocast": Check("enum", choices=("bfloat16", "float16"), optional=True),
    "defense.compile_encoder": BOOL, "defense.reuse_embedding": BOOL,
    "defense.reverse_grouping": Check("enum", choices=("rounds", "start", "image")),
    "vlm.attention": Check("enum", choices=("einsum", "sdpa")),
}


def _value(cfg: DictConfig, key: str) -> tuple[bool, Any]:
    """(present, value) of a dotted key; an interpolation that cannot be resolved is a ConfigError."""
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    if not isinstance(node, DictConfig) or leaf not in node:
        return False, None
    try:
        value = node[leaf]
    except OmegaConfBaseException as e:
        raise ConfigError(f"{key}: {str(e).splitlines()[0]}") from e
    return True, OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig | ListConfig) else value


def check_values(cfg: DictConfig) -> None:
    for key, check in CHECKS.items():
        present, v = _value(cfg, key)
        if not present or check.ok(v):
            continue
        hint = ""
        if key == "attack.eps" and isinstance(v, int | float) and not isinstance(v, bool) and 0 < v < 1:
            hint = (f" (eps is in 1/255 units, so {v} means {v}/255; did you mean attack.eps={round(v * 255)}, "
                    f"i.e. {round(v * 255)}/255?)")
        raise ConfigError(f"{key}={v!r} is not accepted: {key} must be {check.accepted()}{hint}")


# --------------------------------------------------------------------------------------------- combinations


def vlm_tasks(cfg: DictConfig) -> tuple[str, ...] | None:
    """The tasks the configured VLM class supports, read from the class without loading any weights."""
    from hydra.utils import get_method

    target = OmegaConf.select(cfg, "vlm.model._target_")
    if not target:
        return None
    try:
        obj = get_method(target)
    except Exception as e:  # hydra wraps import failures in several types
        raise ConfigError(f"vlm.model._target_={target} cannot be imported ({str(e).splitlines()[0]})") from e
    tasks = getattr(getattr(obj, "__self__", obj), "tasks", None)
    return tuple(tasks) if tasks else None


def select_tasks(cfg: DictConfig, supported: Sequence[str] | None) -> list[str]:
    """The tasks a run evaluates: ``tasks`` if given (each offered by the data set and done by the VLM), else every
    task both support. ``supported`` None means the VLM's tasks are not known yet (only the data set is checked)."""
    offered = list(cfg.dataset.tasks.keys())
    requested = cfg.get("tasks")
    if requested is not None and not (isinstance(requested, ListConfig | list)
                                      and all(isinstance(t, str) for t in requested)):
        raise ConfigError(f"tasks={requested!r} is not accepted: tasks must be null or a list of task names, "
                          f"e.g. tasks=[{offered[0]}] (this data set offers {', '.join(offered)})")
    wanted = list(requested) if requested else [t for t in offered if supported is None or t in supported]
    for t in wanted:
        if t not in offered:
            raise ConfigError(f"tasks: dataset={cfg.dataset.name} has no task '{t}'; it offers {', '.join(offered)}")
        if supported is not None and t not in supported:
            raise ConfigError(f"tasks: vlm={cfg.vlm.name} cannot do '{t}'; it does {', '.join(supported)}")
    if not wanted:
        raise ConfigError(f"vlm={cfg.vlm.name} (tasks {', '.join(supported or ())}) and dataset={cfg.dataset.name} "
                          f"(tasks {', '.join(offered)}) share no task")
    return wanted


def check_device(device: Any) -> None:
    import torch

    name = str(device)
    kind, _, index = name.partition(":")
    if kind not in ("cpu", "cuda", "mps") or (index and not index.isdigit()) or (kind != "cuda" and index):
        raise ConfigError(f"device={device!r} is not accepted: device must be one of cpu, cuda, cuda:N, mps")
    if kind == "cuda" and (not torch.cuda.is_available() or int(index or 0) >= torch.cuda.device_count()):
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        raise ConfigError(f"device={name} is not available ({n} CUDA device(s) visible); use device=cpu")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device=mps is not available on this machine; use device=cpu")


def check_logger(cfg: DictConfig) -> None:
    logger = cfg.get("logger")
    if logger is None or not logger.get("enabled", False):
        return
    try:
        import wandb  # noqa: F401
    except ImportError as e:
        raise ConfigError("logger=wandb needs the wandb package (uv sync), or use logger=none") from e
    if logger.get("mode") == "online" and not os.environ.get("WANDB_API_KEY"):
        raise ConfigError("logger.mode=online needs WANDB_API_KEY in the environment (wandb never asks for it "
                          "here); set it, or use WANDB_MODE=offline or logger=none")


def check_combinations(cfg: DictConfig) -> None:
    attack, defense = cfg.get("attack") or {}, cfg.get("defense") or {}
    if attack.get("adaptive") and defense.get("purifier") is None:
        raise ConfigError(f"attack={attack.get('name')} attacks through a randomized defense but defense="
                          f"{defense.get('name')}; choose defense=diffpure or defense=diffcap")
    if attack.get("adaptive") and attack.get("schedule") == "ensemble":
        raise ConfigError(f"attack.schedule=ensemble is for grey-box APGD only; attack={attack.get('name')} "
                          "accepts attack.schedule=single")
    if defense.get("encoder") == "clip" and cfg.dataset.get("fixed_encoder") is None:
        raise ConfigError(f"defense.encoder=clip needs dataset.fixed_encoder, which dataset={cfg.dataset.name} "
                          "does not define; use defense.encoder=vlm")


CHECKERS: tuple[Callable[[DictConfig], None], ...] = (check_values, check_combinations, check_logger)


def validate(cfg: DictConfig, model: bool = True) -> None:
    """Every check that must fail before any work starts, each with a one-line message naming the key
    (``model=False``: the data set's tasks are not matched against the VLM's, for scripts that load no model)."""
    for group in ("vlm", "dataset", "attack", "defense"):
        if cfg.get(group) is None:
            raise ConfigError(f"{group} is not set; choose one with {group}=NAME")
        reason = cfg[group].get("unavailable")
        if reason:
            raise ConfigError(f"{group}={cfg[group].name} is not available yet: {reason}")
    if isinstance(cfg.get("tasks"), str):  # tasks=classification: one task, without the list brackets
        cfg.tasks = [cfg.tasks]
    from attacks.config import validate_attack

    validate_attack(cfg.attack)
    for checker in CHECKERS:
        checker(cfg)
    check_device(cfg.get("device", "cpu"))
    select_tasks(cfg, vlm_tasks(cfg) if model else None)
    from evaluators.sharding import check as check_shards

    check_shards(cfg)
