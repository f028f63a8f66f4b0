"""Sharded runs: deterministic shards, and a 3-shard run merged equals the unsharded run (records and metrics)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from evaluators.errors import ConfigError
from evaluators.sharding import ShardError, check, find_shard_dirs, merge_shards, shard_ids
from tests.test_runner import env_for, records, run_py

ROOT = Path(__file__).resolve().parents[1]
# attacked and purified (randomized), two tasks, batches that straddle the shard borders
RUN = ["experiment=fast_dev", "n_samples=7", "batch_size=3", "attack=apgd", "attack.steps=3", "defense=diffpure",
       "defense/sampler=ddim", "defense.sampler.steps=2", "defense.eval_draws=2", "tasks=[captioning,vqa]"]


def test_shards_partition_the_subset_in_order():
    ids = [f"s{i}" for i in range(11)]
    for n in (1, 2, 3, 4, 11):
        parts = [shard_ids(ids, n, i) for i in range(n)]
        assert sum(parts, []) == ids
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert shard_ids(ids, 3, 0) == ["s0", "s1", "s2", "s3"]


@pytest.mark.parametrize("n,i", [(0, 0), (3, 3), (3, -1), (20, 0)])
def test_bad_shard_settings_are_refused(n, i):
    with pytest.raises(ConfigError):
        check(OmegaConf.create({"n_shards": n, "shard": i, "n_samples": 10}))


def strip(rec: dict) -> dict:
    """A record without what legitimately differs between jobs: batch index, timings, cache hit or miss."""
    if isinstance(rec, dict):
        return {k: strip(v) for k, v in rec.items() if k not in ("batch", "seconds", "cache")}
    if isinstance(rec, list):
        return [strip(v) for v in rec]
    return rec


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from evaluators.datasets.shapes import generate_shapes

    tmp = tmp_path_factory.mktemp("shards")
    data = tmp / "data"
    generate_shapes(data / "shapes", n_train=8, n_test=48, size=64, seed=0)
    full = tmp / "full"
    # separate caches: each job computes its own adversarial images
    proc = run_py([*RUN, f"hydra.run.dir={full}"], env_for(data, tmp / "cache_full"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = tmp / "sweep"
    proc = run_py(["-m", *RUN, "n_shards=3", "shard=0,1,2", f"hydra.sweep.dir={sweep}"], env_for(data, tmp / "cache_sh"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"full": full, "sweep": sweep, "data": data, "tmp": tmp}


def test_three_shards_merge_to_the_unsharded_run(runs, tmp_path):
    shard_dirs = find_shard_dirs([runs["sweep"]])
    assert len(shard_dirs) == 3
    sizes = sorted(len(records(d)) for d in shard_dirs)
    assert sizes == [2 * 2, 2 * 2, 2 * 3]  # 7 samples: 3 + 2 + 2 per task, two tasks
    out = tmp_path / "merged"
    res = subprocess.run([sys.executable, "scripts/merge_shards.py", str(runs["sweep"]), "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    full = {(r["task"], r["id"]): strip(r) for r in records(runs["full"])}
    merged = {(r["task"], r["id"]): strip(r) for r in records(out)}
    assert merged == full
    a = json.loads((runs["full"] / "summary.json").read_text())
    b = json.loads((out / "summary.json").read_text())
    assert b["metrics"] == a["metrics"]
    assert b["samples"] == a["samples"]
    assert b["defense"].keys() == a["defense"].keys()
    for task in ("captioning", "vqa"):
        assert json.loads((out / f"manifest_{task}.json").read_text()) == \
            json.loads((runs["full"] / f"manifest_{task}.json").read_text())
    # the merged folder is never overwritten
    again = subprocess.run([sys.executable, "scripts/merge_shards.py", str(runs["sweep"]), "--out", str(out)],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and again.stderr.startswith("error:") and "Traceback" not in again.stderr


def test_merge_refuses_missing_incomplete_or_foreign_shards(runs, tmp_path):
    shard_dirs = sorted(find_shard_dirs([runs["sweep"]]), key=lambda d: json.loads((d / "run_config.json").read_text())["shard"])
    with pytest.raises(ShardError, match=r"shard\(s\) \[1\] of 3 missing"):
        merge_shards([shard_dirs[0], shard_dirs[2]], tmp_path / "a")
    with pytest.raises(ShardError, match="more than once"):
        merge_shards([*shard_dirs, shard_dirs[1]], tmp_path / "b")
    # an incomplete shard: one record lost
    broken = tmp_path / "broken"
    shutil.copytree(shard_dirs[1], broken)
    lines = (broken / "samples.jsonl").read_text().splitlines(keepends=True)
    (broken / "samples.jsonl").write_text("".join(lines[:-1]))
    with pytest.raises(ShardError, match="incomplete"):
        merge_shards([shard_dirs[0], broken, shard_dirs[2]], tmp_path / "c")
    # a shard of another run: different config
    foreign = tmp_path / "foreign"
    shutil.copytree(shard_dirs[1], foreign)
    cfg = json.loads((foreign / "run_config.json").read_text())
    cfg["defense"]["t_star"] = 0.2
    (foreign / "run_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ShardError, match="defense.t_star"):
        merge_shards([shard_dirs[0], foreign, shard_dirs[2]], tmp_path / "d")
    # a shard made by other code
    other = tmp_path / "other"
    shutil.copytree(shard_dirs[1], other)
    s = json.loads((other / "summary.json").read_text())
    s["environment"]["git_commit"] = "0" * 40
    (other / "summary.json").write_text(json.dumps(s))
    with pytest.raises(ShardError, match="git_commit"):
        merge_shards([shard_dirs[0], other, shard_dirs[2]], tmp_path / "e")
    # an unfinished shard
    (broken / "summary.json").unlink()
    with pytest.raises(ShardError, match="not finished"):
        merge_shards([shard_dirs[0], broken, shard_dirs[2]], tmp_path / "f")
    assert not any((tmp_path / x).exists() for x in "abcdef")
