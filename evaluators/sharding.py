"""Runs larger than one machine: deterministic shards of a run's evaluated subset, and their merge.

A sharded job (``n_shards=N shard=i``) draws the same subset as the unsharded run, prepares its tasks on the
*whole* subset (so CIDEr's idf, also the one the attack's early stop uses, is the full manifest's), and
then evaluates only its contiguous part ``shard_ids(subset, N, i)``. Each shard is an ordinary run in its
own folder (Hydra's override dirname contains ``shard=i``; a Slurm array through submitit), resumable as
any run, and no two jobs ever write the same file, so no file lock is needed on a cluster file system.

``merge_shards`` checks that every shard of one run is present, finished and consistent (same config
apart from ``shard``, same manifests, same code fingerprints) and then writes the merged run folder, whose
``summary.json`` comes from the same re-scoring code as ``scripts/rescore.py``.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from evaluators import results
from evaluators.errors import ConfigError, HarnessError

#: keys of summary.json's environment that must agree between shards (the code and library versions)
FINGERPRINT_KEYS = ("git_commit", "packages")


class ShardError(HarnessError):
    """The shards given to the merge do not form one complete, consistent run."""


def check(cfg: DictConfig) -> None:
    """One-line errors for impossible shard settings, before anything loads."""
    n, i = cfg.get("n_shards", 1), cfg.get("shard", 0)
    if not isinstance(n, int) or not isinstance(i, int) or isinstance(n, bool) or isinstance(i, bool):
        raise ConfigError(f"n_shards and shard must be integers, got n_shards={n!r} shard={i!r}")
    if n < 1:
        raise ConfigError(f"n_shards must be >= 1, got {n}")
    if not 0 <= i < n:
        raise ConfigError(f"shard must be in [0, n_shards) = [0, {n}), got {i}")
    if n > int(cfg.n_samples):
        raise ConfigError(f"n_shards={n} exceeds n_samples={cfg.n_samples}: some shards would be empty")


def shard_ids(ids: list[str], n_shards: int, shard: int) -> list[str]:
    """Shard ``shard`` of ``n_shards`` contiguous parts of ``ids``; sizes differ by at most one and the
    concatenation of all shards, in order, is ``ids``."""
    base, extra = divmod(len(ids), n_shards)
    start = shard * base + min(shard, extra)
    return list(ids[start : start + base + (1 if shard < extra else 0)])


def shard_slice(subset: list[str], cfg: DictConfig) -> list[str]:
    """This job's part of the drawn subset (the whole subset when the run is not sharded)."""
    check(cfg)
    n = int(cfg.get("n_shards", 1))
    return list(subset) if n == 1 else shard_ids(subset, n, int(cfg.shard))


# --------------------------------------------------------------------------------------------- merge


def find_shard_dirs(paths: list[Path]) -> list[Path]:
    """Run folders of sharded runs: each path is a shard folder or a folder searched for them."""
    found: list[Path] = []
    for p in paths:
        if not p.exists():
            raise ShardError(f"{p} does not exist")
        candidates = [p / "run_config.json"] if (p / "run_config.json").exists() else sorted(p.rglob("run_config.json"))
        for c in candidates:
            if int(json.loads(c.read_text()).get("n_shards", 1)) > 1:
                found.append(c.parent)
    if not found:
        raise ShardError(f"no sharded run (run_config.json with n_shards > 1) under {', '.join(map(str, paths))}")
    return found


def _without_shard(config: dict) -> dict:
    return {k: v for k, v in config.items() if k != "shard"}


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += _diff_keys(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    return [] if a == b else [prefix or "<root>"]


def load_shards(shard_dirs: list[Path]) -> list[dict]:
    """Every shard's config, summary, manifests and records, checked to form one complete run, in shard order."""
    shards = []
    for d in shard_dirs:
        config_path = d / "run_config.json"
        if not config_path.exists():
            raise ShardError(f"{d} has no run_config.json: not a run folder")
        if not (d / results.SUMMARY).exists():
            raise ShardError(f"shard {d} is not finished (no summary.json); resume it with the same command")
        shards.append({"dir": d, "config": json.loads(config_path.read_text()),
                       "summary": json.loads((d / results.SUMMARY).read_text())})
    ref = shards[0]
    for s in shards[1:]:
        diff = _diff_keys(_without_shard(ref["config"]), _without_shard(s["config"]))
        if diff:
            raise ShardError(f"{s['dir']} and {ref['dir']} are not shards of one run (config differs in "
                             f"{', '.join(diff[:8])})")
        for key in FINGERPRINT_KEYS + ("fingerprints",):
            a, b = ref["summary"].get("environment", {}).get(key), s["summary"].get("environment", {}).get(key)
            if key == "fingerprints":
                a, b = ref["summary"].get(key), s["summary"].get(key)
            if a != b:
                raise ShardError(f"{s['dir']} and {ref['dir']} were made by different code or libraries "
                                 f"({key} differs: {', '.join(_diff_keys(a, b)[:5])})")
    n = int(ref["config"]["n_shards"])
    by_index: dict[int, list[dict]] = defaultdict(list)
    for s in shards:
        by_index[int(s["config"]["shard"])].append(s)
    dup = sorted(i for i, v in by_index.items() if len(v) > 1)
    missing = sorted(set(range(n)) - set(by_index))
    if dup:
        raise ShardError(f"shard(s) {dup} given more than once: {[str(s['dir']) for i in dup for s in by_index[i]]}")
    if missing:
        raise ShardError(f"shard(s) {missing} of {n} missing; run them (shard={','.join(map(str, missing))}) first")
    ordered = [by_index[i][0] for i in range(n)]
    for s in ordered:
        _check_complete(s, n)
    return ordered


def _check_complete(shard: dict, n_shards: int) -> None:
    """Every sample of this shard's part of each task's manifest has exactly one record, and nothing else."""
    d, index = shard["dir"], int(shard["config"]["shard"])
    records = results.read_records(d / results.SAMPLES)
    shard["records"], shard["manifests"] = records, {}
    tasks = sorted({p.name[len("manifest_"):-len(".json")] for p in d.glob("manifest_*.json")})
    if not tasks:
        raise ShardError(f"shard {d} has no manifest_<task>.json")
    for task in tasks:
        manifest = json.loads(results.manifest_path(d, task).read_text())
        shard["manifests"][task] = manifest
        want = shard_ids(manifest["ids"], n_shards, index)
        got = [r["id"] for r in records if r["task"] == task]
        if len(got) != len(set(got)) or sorted(got) != sorted(want):
            raise ShardError(f"shard {d} is incomplete or inconsistent for task {task}: {len(set(got) & set(want))} "
                             f"of {len(want)} expected samples, {len(set(got) - set(want))} unexpected, "
                             f"{len(got) - len(set(got))} duplicated; resume it with the same command")
    extra = sorted({r["task"] for r in records} - set(tasks))
    if extra:
        raise ShardError(f"shard {d} has records of tasks without a manifest: {extra}")


def merge_shards(shard_dirs: list[Path], out_dir: Path) -> dict:
    """Write the merged run (records in manifest order, manifests, run_config.json, summary.json) to ``out_dir``.

    Refuses to write into a folder that already holds records, so a good merged run is never overwritten."""
    from evaluators.rescoring import rescore

    shards = load_shards(shard_dirs)
    ref = shards[0]
    for s in shards[1:]:
        if s["manifests"] != ref["manifests"]:
            raise ShardError(f"{s['dir']} and {ref['dir']} drew different subsets (manifests differ)")
    if (out_dir / results.SAMPLES).exists():
        raise ShardError(f"{out_dir} already holds a run (samples.jsonl); choose an empty --out folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    merged: list[dict] = []
    for task, manifest in ref["manifests"].items():
        by_id = {r["id"]: r for s in shards for r in s["records"] if r["task"] == task}
        merged += [by_id[i] for i in manifest["ids"]]
        results.write_json_atomic(results.manifest_path(out_dir, task), manifest)
    config = {**ref["config"], "n_shards": 1, "shard": 0, "merged_from_shards": int(ref["config"]["n_shards"])}
    results.write_json_atomic(out_dir / "run_config.json", config)
    results.RecordWriter(out_dir).write_batch(merged)
    extra = {
        "shards": [{"dir": str(s["dir"]), "environment": s["summary"].get("environment"),
                    "timing_seconds": s["summary"].get("timing_seconds")} for s in shards],
        "environment": ref["summary"].get("environment"),
    }
    for key in ("fingerprints",):
        if key in ref["summary"]:
            extra[key] = ref["summary"][key]
    summary = rescore(out_dir, extra=extra)
    summary["config"] = config
    results.write_json_atomic(out_dir / results.SUMMARY, summary)
    return summary
