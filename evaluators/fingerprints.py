"""sha256 fingerprints of the weights and data annotation files a run reads.

A fingerprint is what a result depends on, where a path is only where it happened to be: ``summary.json`` records
them, the adversarial cache keys on them, and a resumed run compares them (moving data or checkpoints is fine,
changing them is refused). Hashing a 14 GB checkpoint takes a while, so each file's hash is cached under the
harness's cache folder, keyed by its real path, size and modification time (weight stores are often read-only, so
nothing is written next to the weights). A checkpoint folder may publish its hashes in ``SHA256SUMS``
(``sha256sum`` format); every listed file is checked against it when the run starts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from evaluators.errors import IntegrityError

log = logging.getLogger(__name__)

PUBLISHED = "SHA256SUMS"
#: keys of a model node that name a checkpoint file or folder (OpenFlamingo's are open_flamingo's argument names)
CHECKPOINT_KEYS = ("path", "checkpoint", "weights", "lang_encoder_path", "tokenizer_path", "clip_vision_encoder_path",
                   "clip_vision_encoder_pretrained")
#: files of a checkpoint folder that do not change results
NOT_WEIGHTS = (PUBLISHED, "README.md")


def sha256_file(path: str | Path, cache_dir: str | Path | None = None) -> str:
    """The file's sha256, from the cache when its (real path, size, mtime) has been hashed before."""
    p = Path(path).resolve()
    st = p.stat()
    stamp = {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    entry = None
    if cache_dir is not None:
        entry = Path(cache_dir) / "fingerprints" / f"{hashlib.sha256(str(p).encode()).hexdigest()}.json"
        if entry.exists():
            try:
                known = json.loads(entry.read_text())
                if {k: known.get(k) for k in stamp} == stamp and len(known["sha256"]) == 64:
                    return known["sha256"]
            except (OSError, ValueError, KeyError, TypeError):
                log.warning("ignoring a damaged fingerprint cache entry %s; hashing %s again", entry, p)
    h = hashlib.sha256()
    with p.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    digest = h.hexdigest()
    if entry is not None:
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            tmp = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({**stamp, "sha256": digest}))
            os.replace(tmp, entry)
        except OSError as e:  # a read-only cache only costs time
            log.warning("cannot cache the fingerprint of %s in %s: %s", p, entry.parent, e)
    return digest


def published_hashes(folder: Path) -> dict[str, str]:
    """``SHA256SUMS`` of a checkpoint folder as {file name: sha256}; empty when the folder publishes none."""
    path = folder / PUBLISHED
    if not path.is_file():
        return {}
    out = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        digest, _, name = line.strip().partition(" ")
        name = name.strip().lstrip("*")
        if len(digest) != 64 or not name:
            raise IntegrityError(f"{path}:{n} is not a sha256sum line ('<64 hex digits>  <file name>'); restore "
                                 f"the file (git checkout -- {path})")
        out[name] = digest.lower()
    return out


def published_for(folder: Path, levels: int = 2) -> tuple[dict[str, str], Path | None]:
    """The nearest ``SHA256SUMS`` at or above ``folder`` (up to ``levels`` parents: a checkpoint such as
    OpenFlamingo's publishes one list for its subfolders, e.g. ``lm/model.safetensors``), as ({name relative to the
    list's folder: sha256}, the list's path); ({}, None) when there is none."""
    for d in [folder, *folder.parents][: levels + 1]:
        if (d / PUBLISHED).is_file():
            return published_hashes(d), d / PUBLISHED
    return {}, None


def checkpoint_fingerprint(path: str | Path, cache_dir: str | Path | None = None) -> dict[str, str]:
    """{file name: sha256} of a checkpoint file or of every file of a checkpoint folder, verified against the
    folder's published hashes. A path that does not exist (a hub id, or a missing file the loader will report)
    is recorded as {"ref": path}."""
    p = Path(path)
    if p.is_file():
        files, folder = [p], p.parent
    elif p.is_dir():
        files, folder = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith(".")
                               and f.name not in NOT_WEIGHTS), p
    else:
        return {"ref": str(path)}
    published, listing = published_for(folder)
    out = {}
    for f in files:
        digest = sha256_file(f, cache_dir)
        want = published.get(f.relative_to(listing.parent).as_posix()) if listing is not None else None
        if want is not None and want != digest:
            raise IntegrityError(f"{f} does not match its published sha256 in {listing} (expected "
                                 f"{want[:12]}..., got {digest[:12]}...); the file is damaged or was replaced: "
                                 "restore it (git checkout, or download it again)")
        out[f.name] = digest
    return out


def _find_checkpoints(node: Any, prefix: str) -> dict[str, str]:
    out: dict[str, str] = {}
    if isinstance(node, dict):
        for k, v in node.items():
            if k in CHECKPOINT_KEYS and isinstance(v, str):
                out[f"{prefix}.{k}"] = v
            elif isinstance(v, dict):
                out.update(_find_checkpoints(v, f"{prefix}.{k}"))
    return out


def checkpoint_paths(cfg: DictConfig) -> dict[str, str]:
    """{config key: path} of every checkpoint the run loads: the VLM's; the denoiser's and the fixed encoder's
    only when the defense uses them."""
    nodes = {"vlm": cfg.vlm}
    if cfg.defense.get("purifier") is not None:
        nodes["denoiser"] = cfg.get("denoiser")
        if cfg.defense.get("encoder") == "clip":
            nodes["dataset.fixed_encoder"] = cfg.dataset.get("fixed_encoder")
    out: dict[str, str] = {}
    for name, node in nodes.items():
        if node is not None:
            out.update(_find_checkpoints(OmegaConf.to_container(node, resolve=True), name))
    return out


def annotation_paths(cfg: DictConfig, tasks: list[str]) -> dict[str, str]:
    """{task.key: path} of the annotation files (``*_file`` keys of each task's source) of the evaluated tasks."""
    out = {}
    for t in tasks:
        source = OmegaConf.to_container(cfg.dataset.tasks[t], resolve=True).get("source") or {}
        for k, v in source.items():
            if k.endswith("_file") and isinstance(v, str):
                out[f"{t}.{k}"] = v
    return out


def fingerprint_run(cfg: DictConfig, tasks: list[str]) -> dict[str, dict[str, Any]]:
    """{"weights": {key: {file: sha256}}, "data": {task.key: sha256}}: everything a run's results depend on
    besides its config. Checkpoints are verified against their published hashes on the way."""
    cache = cfg.paths.get("cache_dir")
    weights = {k: checkpoint_fingerprint(p, cache) for k, p in checkpoint_paths(cfg).items()}
    data = {k: sha256_file(p, cache) if Path(p).is_file() else None for k, p in annotation_paths(cfg, tasks).items()}
    return {"weights": weights, "data": data}


def changed(previous: dict[str, Any], now: dict[str, Any], where: dict[str, str]) -> list[str]:
    """Human-readable names of the fingerprints that differ between two runs (keys present in both)."""
    out = []
    for section in ("weights", "data"):
        old, new = previous.get(section) or {}, now.get(section) or {}
        for k in sorted(set(old) & set(new)):
            if section == "weights" and ("ref" in old[k] or "ref" in new[k]):
                continue  # a hub id or a missing checkpoint: the loader says what it is
            if old[k] != new[k]:
                out.append(f"{'weights' if section == 'weights' else 'annotation file'} {k} ({where.get(k, '?')})")
    return out
