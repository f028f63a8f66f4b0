"""A cost model for runs: predicted device time = sum over unit kinds of (evaluations per image x images x unit cost).

Why: a run's cost on real models is decided by a few counts the harness already records (denoiser and encoder
evaluations per purification, APGD runs per image, predictions) and by the cost of one evaluation of each network
on the target hardware. The counts come from a run's records or, before any run, from its config; the unit costs
come from ``results/bench/unit_costs.json`` (measured by the benchmark scripts; entries not measured yet are kept
with ``seconds_per_image: null`` and a ``missing`` reason, and a prediction names them instead of guessing).

Unit kinds: ``denoiser_eval`` (one UNet evaluation), ``encoder_eval`` (one phi evaluation of DiffCAP),
``vlm_fwd_bwd`` (one APGD step: the loss and its gradient w.r.t. the pixels), ``vlm_predict`` (one prediction:
a caption or answer generated, or zero-shot logits), each per image at a batch size.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from evaluators.errors import ConfigError, DataError
from evaluators.results import write_text_atomic
from evaluators.vlms.checkpoints import parse_dtype

KINDS = ("denoiser_eval", "encoder_eval", "vlm_fwd_bwd", "vlm_predict")
#: the unit-cost table's file name; the benchmark scripts write it beside their results (``--out``'s folder)
UNIT_FILE = "unit_costs.json"
#: denoiser loaders -> architecture names of the unit-cost table
DENOISER_ARCH = {"diffcap.denoisers.load_guided_diffusion": "guided_diffusion_256",
                 "diffcap.denoisers.load_shapes_denoiser": "shapes_denoiser"}


class OneLineParser(argparse.ArgumentParser):
    """argparse for the performance scripts: a bad argument is a ``ConfigError`` (one ``error:`` line, exit 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(f"{self.prog}: {message}")


def comma_list(option: str, text: str, kind: type = str, allowed: Iterable[object] | None = None) -> list:
    """A performance script's comma-separated option value, each item converted by ``kind`` and, with ``allowed``,
    one of those; anything else is a ``ConfigError`` naming the option."""
    allowed = None if allowed is None else tuple(allowed)
    what = f"a comma-separated list of {', '.join(map(str, allowed))}" if allowed else \
        f"a comma-separated list of {kind.__name__} values"
    try:
        items = [kind(t) for t in text.split(",") if t]
    except ValueError:
        items = []
    if not items or (allowed and any(i not in allowed for i in items)):
        raise ConfigError(f"{option}={text!r} is not accepted: {what}")
    return items


#: a speed option goes on by default only if at least this much faster (median of paired repeats), and faster in
#: every repeat (``faster``); the performance scripts share the rule
MIN_GAIN = 1.03


def faster(gains: Sequence[float]) -> bool:
    """The timing half of the rule for keeping a speed option: ``gains`` (default time / option time, one per
    paired repeat) have a median of at least ``MIN_GAIN`` and all exceed 1."""
    return bool(gains) and statistics.median(gains) >= MIN_GAIN and min(gains) > 1


def check_overrides(overrides: Iterable[str]) -> None:
    """What argparse left over must be Hydra overrides (key=value)."""
    if bad := [o for o in overrides if not o.partition("=")[1] or o.startswith("-")]:
        raise ConfigError(f"unknown argument(s) {bad}: options start with --, overrides are key=value")


def write_part(prefix: Path, part: str, result: dict, markdown: str) -> None:
    """One benchmark part's results: ``<prefix>_<part>.json`` (everything) and ``.md`` (the table), also printed."""
    out = Path(f"{prefix}_{part}")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out.with_suffix(".json"), json.dumps(result, indent=1, default=str) + "\n")
    write_text_atomic(out.with_suffix(".md"), markdown)
    print(f"\n## {part}\n\n{markdown}", flush=True)


def machine() -> dict[str, Any]:
    """Where a measurement ran and how loaded the machine was (load averages over 1, 5, 15 minutes)."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    cpu = next((line.split(":", 1)[1].strip() for line in _read("/proc/cpuinfo").splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "load_avg": list(os.getloadavg()),
            "when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


# --------------------------------------------------------------------------------------------- unit costs


@dataclass
class Unit:
    """Seconds per image of one evaluation of ``kind`` by ``arch`` in ``precision`` on ``device`` at ``batch``."""

    arch: str
    kind: str
    precision: str
    device: str
    batch: int
    seconds_per_image: float | None = None
    missing: str | None = None  # why there is no measurement yet
    source: str | None = None  # the command that measured it
    machine: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str, str, str]:
        return self.arch, self.kind, self.precision, self.device


def read_units(path: Path) -> list[Unit]:
    if not path.exists():
        return []
    try:
        rows = json.loads(path.read_text())["units"]
        return [Unit(**r) for r in rows]
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path} is not a unit-cost table ({e}); restore it from git") from e


def write_units(path: Path, new: Iterable[Unit]) -> list[Unit]:
    """Insert or replace (same arch, kind, precision, device and batch) and write the table, sorted."""
    table = {(*u.key, u.batch): u for u in read_units(path)}
    for u in new:
        if u.kind not in KINDS:
            raise ValueError(f"unknown unit kind {u.kind!r}; one of {KINDS}")
        table[(*u.key, u.batch)] = u
    units = [table[k] for k in sorted(table)]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps({"what": __doc__.split("\n")[0], "units": [asdict(u) for u in units]},
                                       indent=1) + "\n")
    return units


def lookup(units: Iterable[Unit], arch: str, kind: str, precision: str, device: str, batch: int) -> Unit | None:
    """The measured unit for this key whose batch is closest to ``batch`` (ties: the larger batch), else the
    entry that says why it is missing, else None."""
    rows = [u for u in units if u.key == (arch, kind, precision, device)]
    measured = [u for u in rows if u.seconds_per_image is not None]
    if measured:
        return min(measured, key=lambda u: (abs(u.batch - batch), -u.batch))
    return rows[0] if rows else None


# --------------------------------------------------------------------------------------------- counts


@dataclass
class Counts:
    """Evaluations per image of one task of a run (all conditions and purification draws together)."""

    denoiser_eval: float = 0.0
    encoder_eval: float = 0.0
    vlm_fwd_bwd: float = 0.0
    vlm_predict: float = 0.0
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in KINDS}


def counts_from_records(records: list[dict], steps: int) -> dict[str, Counts]:
    """Per task, mean evaluations per image of a finished run (``samples.jsonl``), as if every attack ran fresh:
    APGD runs x (steps + 1) loss/gradient evaluations, one prediction per condition and draw plus the attack's
    scoring (the clean image and each APGD run's result), and the purifier's recorded evaluations."""
    by_task: dict[str, list[dict]] = {}
    for r in records:
        if r.get("status") == "ok":
            by_task.setdefault(r["task"], []).append(r)
    out = {}
    for task, recs in by_task.items():
        c = Counts()
        for r in recs:
            for pred in r["predictions"].values():
                c.vlm_predict += len(pred) if isinstance(pred, list) else 1
            for draws in r.get("defense", {}).values():
                c.denoiser_eval += sum(d["denoiser_evals"] for d in draws)
                c.encoder_eval += sum(d["encoder_evals"] for d in draws)
            runs = int(r.get("attack", {}).get("runs", 0))
            c.vlm_fwd_bwd += runs * (steps + 1)
            c.vlm_predict += runs + 1 if "attack" in r else 0
        n = len(recs)
        out[task] = Counts(**{k: v / n for k, v in c.as_dict().items()}, notes=[f"counts of {n} recorded samples"])
    return out


def max_apgd_runs(cfg: DictConfig, task: str) -> int:
    """APGD runs per image of the configured schedule when no image leaves it early (an upper bound)."""
    from evaluators.tasks.captioning import N_ENSEMBLE_CAPTIONS
    from evaluators.tasks.vqa import ENSEMBLE_TARGETS, N_ENSEMBLE_ANSWERS

    attack = cfg.attack
    if task == "classification":
        proto = attack.get("zero_shot") or {}
        runs = int(proto.get("ce_restarts", 1)) if "apgd-ce" in proto.get("attacks", ["apgd-ce"]) else 0
        return runs + (int(proto.get("target_classes", 0)) if "apgd-t" in proto.get("attacks", []) else 0)
    if attack.get("schedule") != "ensemble":
        return 1
    if task == "captioning":
        return N_ENSEMBLE_CAPTIONS + 1
    return N_ENSEMBLE_ANSWERS + 1 + len(ENSEMBLE_TARGETS)


def counts_from_config(cfg: DictConfig, task: str, diffcap_t: float | None) -> Counts:
    """Evaluations per image of one task from the config alone (before any run): APGD runs at their upper bound
    (no early stop), DiffPure's evaluations from its sampler, DiffCAP's from an assumed mean stopping time."""
    from hydra.utils import instantiate

    c = Counts()
    attack = cfg.attack.get("method") is not None
    draws = int(cfg.defense.get("eval_draws", 0)) if cfg.defense.get("purifier") is not None else 0
    c.vlm_predict = 1 + draws + (1 + draws if attack else 0)
    if attack:
        if cfg.attack.get("adaptive"):
            raise ConfigError(f"attack={cfg.attack.name} (adaptive) is not in the cost model; use a grey-box attack")
        runs = max_apgd_runs(cfg, task)
        c.vlm_fwd_bwd = runs * (int(cfg.attack.steps) + 1)
        c.vlm_predict += runs + 1
        c.notes.append(f"at most {runs} APGD run(s) per image (no early stop)")
    if not draws:
        return c
    sampler = instantiate(cfg.defense.sampler)
    conditions = 2 if attack else 1
    if cfg.defense.name == "diffpure":
        c.denoiser_eval = conditions * draws * int(sampler.num_evals([float(cfg.defense.t_star)])[0])
    elif diffcap_t is None:
        c.notes.append("DiffCAP's stopping time is unknown before a run: its evaluations are missing "
                       "(pass --diffcap-t or --counts)")
        c.denoiser_eval = c.encoder_eval = float("nan")
    else:
        from diffcap.schedule import LINEAR  # the schedule the samplers' num_evals count on, as here

        moves = round(int(LINEAR.steps(diffcap_t)) / int(cfg.defense.step))
        c.denoiser_eval = conditions * draws * int(sampler.num_evals([diffcap_t])[0])
        c.encoder_eval = conditions * draws * (1 + moves // int(cfg.defense.check_every))
        c.notes.append(f"DiffCAP assumed to stop at t = {diffcap_t} for every image")
    return c


# --------------------------------------------------------------------------------------------- prediction


def architectures(cfg: DictConfig) -> dict[str, tuple[str, str]]:
    """(arch, precision) of the network behind each unit kind of a run."""
    vlm = str(cfg.vlm.name)
    vlm_precision = _precision(cfg.vlm.get("dtype", "float32"), "vlm.dtype")
    out = {"vlm_fwd_bwd": (vlm, vlm_precision), "vlm_predict": (vlm, vlm_precision),
           "encoder_eval": (vlm, vlm_precision)}
    den = cfg.get("denoiser")
    if den is not None:
        target = str(den._target_)
        arch = DENOISER_ARCH.get(target, target)
        # the loaders' default dtypes: guided-diffusion "auto" (its fp16 torso on a GPU), the shapes UNet float32
        precision = den.get("autocast") or str(den.get("dtype", "auto" if arch == "guided_diffusion_256" else
                                                       "float32"))
        if precision == "auto":
            precision = "float16" if arch == "guided_diffusion_256" and str(cfg.device).startswith("cuda") else "float32"
        out["denoiser_eval"] = (arch, _precision(precision, "denoiser.dtype"))
    return out


def _precision(value: object, key: str) -> str:
    """The unit table's precision name of a config dtype (fp16, half, torch.float16, ... -> "float16")."""
    return str(parse_dtype(str(value).lower(), key)).removeprefix("torch.")


@dataclass
class Prediction:
    """Predicted seconds of one task of one job: the known part, and the terms whose unit cost is missing."""

    seconds: float
    terms: dict[str, dict[str, Any]]
    missing: list[str]

    @property
    def complete(self) -> bool:
        return not self.missing


def predict(counts: Counts, n_images: int, archs: Mapping[str, tuple[str, str]], units: list[Unit],
            device: str, batch: int) -> Prediction:
    """seconds = sum over kinds of counts[kind] x n_images x seconds_per_image[kind]; a kind with evaluations but
    no measured unit (or an unknown count) is named in ``missing`` and left out of ``seconds``."""
    total, terms, missing = 0.0, {}, []
    for kind in KINDS:
        n = getattr(counts, kind)
        if n == 0:
            continue
        arch, precision = archs.get(kind, ("?", "?"))
        u = lookup(units, arch, kind, precision, device, batch)
        label = f"{kind} [{arch}, {precision}, {device}]"
        if n != n:  # NaN: the count itself is unknown
            missing.append(f"{label}: count unknown")
            continue
        if u is None or u.seconds_per_image is None:
            reason = (u.missing if u is not None else None) or "not measured"
            missing.append(f"{label}: {reason}")
            terms[kind] = {"evals_per_image": n, "unit": None}
            continue
        seconds = n * n_images * u.seconds_per_image
        total += seconds
        terms[kind] = {"evals_per_image": n, "unit": u.seconds_per_image, "unit_batch": u.batch, "seconds": seconds}
    return Prediction(total, terms, missing)


def sweep_overrides(experiment_file: Path) -> list[list[str]]:
    """The jobs of an experiment's Hydra sweep (``hydra.sweeper.params``), one override list per job."""
    import itertools

    node = OmegaConf.load(experiment_file)
    params = OmegaConf.select(node, "hydra.sweeper.params") or {}
    keys = list(params)
    values = [str(params[k]).split(",") for k in keys]
    return [[f"{k}={v}" for k, v in zip(keys, combo, strict=True)] for combo in itertools.product(*values)]
