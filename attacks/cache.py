"""Adversarial images stored as float tensors (safetensors; never 8-bit PNG, which would weaken them), keyed by
everything that determines them, so a sweep over defenses or tau attacks each image once."""

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
        self.hits = self.misses = self.writes = 0

    @staticmethod
    def key(material: dict[str, Any]) -> str:
        """sha256 of the canonical JSON of everything that determines one adversarial image."""
        return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> tuple[torch.Tensor, dict] | None:
        path = self._path(key)
        if not self.enabled or not path.exists():
            self.misses += 1
            return None
        tensor = load_file(str(path))["x_adv"]
        meta_path = path.with_suffix(".json")
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
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
        return {"hits": self.hits, "misses": self.misses, "writes": self.writes}


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
