"""Checks that a model folder or file is complete, run before anything heavy is imported or loaded, so a
wrong path fails in a second with one line naming the config key and what the folder must contain.

A Hugging Face hub id (``org/name``) is resolved from the local cache only: nothing is downloaded, ever.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

from evaluators.errors import ConfigError
from evaluators.vlms.base import CheckpointError

#: weight files transformers reads (one, or a sharded index)
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_folder(path: str | Path, key: str, layout: str) -> Path:
    """``path`` as a local folder, or a hub id's snapshot in the local Hugging Face cache."""
    p = Path(str(path)).expanduser()
    if p.is_dir():
        return p
    if _HUB_ID.match(str(path)) and not p.exists():
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(str(path), local_files_only=True))
        except Exception:  # noqa: BLE001 (any miss: not cached, no such revision, offline)
            pass
    raise CheckpointError(f"{key}={path}: no such folder, and not a model in the local Hugging Face cache; "
                          f"set {key} to a folder in the {layout} layout (nothing is downloaded)")


def require_files(folder: Path, key: str, needs: Sequence[tuple[str, Sequence[str]]]) -> None:
    """Each ``(what, alternatives)`` must have at least one of its file names in ``folder``; a sharded index
    must have all its shards."""
    missing = []
    for what, names in needs:
        found = [n for n in names if (folder / n).is_file()]
        if not found:
            missing.append(f"{what} ({' or '.join(names)})")
            continue
        if found[0].endswith(".index.json"):
            try:
                shards = sorted(set(json.loads((folder / found[0]).read_text())["weight_map"].values()))
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"{key}={folder}: {found[0]} is not a weight index ({e})") from None
            absent = [s for s in shards if not (folder / s).is_file()]
            if absent:
                missing.append(f"the weight shards {', '.join(absent)} listed in {found[0]}")
    if missing:
        raise CheckpointError(f"{key}={folder} is incomplete: it lacks {'; '.join(missing)}")


def read_config(folder: Path, key: str, model_types: Sequence[str], layout: str) -> dict:
    """``config.json``, checked to describe one of ``model_types``."""
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{key}={folder}: config.json is unreadable ({e})") from None
    if cfg.get("model_type") not in model_types:
        raise CheckpointError(f"{key}={folder}: config.json has model_type {cfg.get('model_type')!r}, expected "
                              f"{' or '.join(model_types)} (a checkpoint in the {layout} layout)")
    return cfg


def has_chat_template(folder: Path) -> bool:
    """Whether the folder carries a chat template (its own file, or inside a processor/tokenizer config)."""
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    for name in ("processor_config.json", "tokenizer_config.json"):
        f = folder / name
        if f.is_file():
            try:
                if json.loads(f.read_text()).get("chat_template"):
                    return True
            except ValueError:
                continue
    return False


def parse_dtype(value: str, key: str):
    """"float16" | "bfloat16" | "float32" (also fp16, bf16, fp32) -> torch dtype."""
    import torch

    names = {"float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
             "float64": torch.float64, "fp64": torch.float64}
    name = str(value).removeprefix("torch.")
    if name not in names:
        raise ConfigError(f"{key}={value!r}: use float16, bfloat16 or float32")
    return names[name]
