"""The adversarial cache: keys, atomic writes, and a damaged entry read as a miss with a warning."""

from __future__ import annotations

import logging

import pytest
import torch

from attacks.cache import AdversarialCache


def test_cache_round_trip_keys_and_atomic_writes(tmp_path, monkeypatch):
    cache = AdversarialCache(tmp_path)
    base = dict(weights={"vlm.model.path": {"model.safetensors": "ab" * 32}}, image="cd" * 32,
                task={"gt_normalisation": "always"}, attack={"eps": 4, "steps": 100}, seed=0, harness_version=1)
    key = cache.key(base)
    assert cache.get(key) is None
    x = torch.rand(3, 8, 8, dtype=torch.float32) / 3
    cache.put(key, x, {"id": "1"})
    got, meta = cache.get(key)
    assert torch.equal(got, x) and got.dtype == torch.float32 and meta == {"id": "1"}
    assert cache.stats() == {"hits": 1, "misses": 1, "writes": 1, "damaged": 0}
    variants = [dict(base, attack={"eps": 2, "steps": 100}), dict(base, seed=1),
                dict(base, weights={"vlm.model.path": {"model.safetensors": "ef" * 32}}), dict(base, image="00" * 32),
                dict(base, task={"gt_normalisation": "never"}), dict(base, subset="12" * 32),
                dict(base, harness_version=2), dict(base, defense={"tau": 0.9})]
    keys = {cache.key(v) for v in variants}
    assert len(keys) == len(variants) and key not in keys
    assert cache.key(dict(base, attack={"eps": 4, "steps": 100, "eval_draws": 10})) == key
    with pytest.raises(ValueError, match="weights"):
        cache.key({k: v for k, v in base.items() if k != "weights"})

    import attacks.cache as cache_module

    def broken_save(tensors, path):
        with open(path, "wb") as f:
            f.write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(cache_module, "save_file", broken_save)
    other = cache.key(dict(base, seed=7))
    with pytest.raises(KeyboardInterrupt):
        cache.put(other, x, {})
    assert cache.get(other) is None
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".tmp-")]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "wrong_shape", "nan", "bad_meta"])
def test_cache_damaged_entry_is_a_miss_with_a_warning(tmp_path, caplog, damage):
    from safetensors.torch import save_file

    cache = AdversarialCache(tmp_path)
    key = cache.key(dict(weights={}, image="x", task={}, attack={}, seed=0, harness_version=1))
    x = torch.rand(3, 8, 8)
    cache.put(key, x, {"id": "1"})
    path = cache._path(key)
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:40])
    elif damage == "garbage":
        path.write_bytes(b"\x00" * 100)
    elif damage == "wrong_shape":
        save_file({"x_adv": torch.rand(3, 4, 4)}, str(path))
    elif damage == "nan":
        save_file({"x_adv": torch.full((3, 8, 8), float("nan"))}, str(path))
    else:
        path.with_suffix(".json").write_text("{not json")
    with caplog.at_level(logging.WARNING):
        assert cache.get(key, like=x) is None
    assert str(path) in caplog.text and cache.stats()["damaged"] == 1
