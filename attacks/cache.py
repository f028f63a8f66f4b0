"""Adversarial images stored as float tensors (safetensors; never 8-bit PNG, which would weaken them), keyed by
everything that determines them, so a sweep over defenses or tau attacks each image once.

The key is the sha256 of one dict of key material, built at one call site: the attacked weights' fingerprint, the
hash of the clean image's pixels, the task config, the evaluated subset where the metric depends on it (CIDEr's
idf), the attack config without ``eval_draws``, the noise seed, ``harness_version`` and, for adaptive attacks, the
defense config with its denoiser's fingerprint. A damaged entry is a miss (with a warning naming the file)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)


class AdversarialCache:
    def __init__(self, root: str | Path, enabled: bool = True):
        self.root, self.enabled = Path(root), enabled
        self.hits = self.misses = self.writes = self.damaged = 0

    #: what a key must be made of (``key`` refuses material without them, so no call site can forget one)
    REQUIRED = ("weights", "image", "task", "attack", "seed", "harness_version")

    @classmethod
    def key(cls, material: dict[str, Any]) -> str:
        """sha256 of the canonical JSON of the key material (see the module docstring for what it holds)."""
        missing = [k for k in cls.REQUIRED if k not in material]
        if missing:
            raise ValueError(f"adversarial cache key material lacks {missing}")
        attack = dict(material["attack"] or {})
        for k in ("eval_draws", "from_cache"):  # they change how images are judged or read, not the images
            attack.pop(k, None)
        canonical = json.dumps({**material, "attack": attack}, sort_keys=True, default=str, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def get(self, key: str, like: torch.Tensor | None = None) -> tuple[torch.Tensor, dict] | None:
        """The cached image and its metadata, or None. An entry that cannot be read, or whose tensor does not have
        ``like``'s shape or holds non-finite values, is a miss: it is logged and recomputed (then overwritten)."""
        path = self._path(key)
        if not self.enabled or not path.exists():
            self.misses += 1
            return None
        meta_path = path.with_suffix(".json")
        try:
            tensor = load_file(str(path))["x_adv"]
            meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
            if not isinstance(meta, dict):
                raise ValueError("metadata is not a JSON object")
            if like is not None and tuple(tensor.shape) != tuple(like.shape):
                raise ValueError(f"shape {tuple(tensor.shape)} instead of {tuple(like.shape)}")
            if not torch.isfinite(tensor).all():
                raise ValueError("non-finite values")
        except Exception as e:  # safetensors raises its own error types for damaged files
            log.warning("damaged adversarial cache entry %s (%s); recomputing it", path, str(e).splitlines()[0][:200])
            self.misses += 1
            self.damaged += 1
            return None
        self.hits += 1
        return tensor, meta

    def put(self, key: str, tensor: torch.Tensor, meta: dict[str, Any]) -> None:
        if not self.enabled:
            return
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic(path.with_suffix(".json"), lambda p: Path(p).write_text(json.dumps(meta, default=str)))
        _atomic(path, lambda p: save_file({"x_adv": tensor.detach().cpu().contiguous()}, p))
        self.writes += 1

    def stats(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "writes": self.writes, "damaged": self.damaged}


def _atomic(path: Path, write) -> None:
    """Write through a temporary file in the same folder and rename, so a kill never leaves half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
