"""One run folder holds one run: an exclusive lock while a process works in it, and ``run_config.json`` (the
resolved config plus the fingerprints of the weights and data) written once everything is built.

Resuming compares the config without the keys that name places (paths, data roots, checkpoint locations) and the
fingerprints instead of them: moving the data or the checkpoints is allowed, changing their content is refused.
A refused start changes nothing in the folder (Hydra's ``.hydra/`` record is written here, after the checks).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from evaluators.errors import DamagedFileError, IntegrityError, RunFolderError
from evaluators.fingerprints import changed

RUN_CONFIG = "run_config.json"
LOCK = ".lock"
#: config keys that do not change results; a run folder may be resumed with other values for them
RESUME_FREE_KEYS = ("resume", "device", "logger", "paths", "torch_threads")
#: leaf keys that name a place, not a content: compared through fingerprints instead
PATH_KEYS = ("path", "root", "dir", "checkpoint", "weights")
PATH_SUFFIXES = ("_file", "_dir", "_root", "_path")


@contextlib.contextmanager
def locked(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``run_dir`` (released when the process ends, even by SIGKILL).

    A folder this call created is removed again when nothing but the lock was written into it (a start that
    failed its checks leaves nothing behind)."""
    created = [d for d in (run_dir, *run_dir.parents) if not d.exists()]
    if not created and not any(run_dir.iterdir()):
        created = [run_dir]  # an empty folder (Hydra makes it before the job starts) counts as new
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except PermissionError:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise RunFolderError(f"cannot write in the run folder {run_dir} ({e.strerror}); fix its permissions "
                                 "or choose another with hydra.run.dir=...") from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise RunFolderError(f"another process is running in {run_dir}; wait for it to finish, or choose "
                                 "another folder with hydra.run.dir=...") from e
        yield
    finally:
        os.close(fd)
        _remove_if_untouched(created, path)


def _remove_if_untouched(created: list[Path], lock: Path) -> None:
    """Undo ``mkdir`` for folders that hold nothing but the lock file."""
    if not created or [p.name for p in created[0].iterdir()] != [lock.name]:
        return
    lock.unlink(missing_ok=True)
    for d in created:  # innermost first
        try:
            d.rmdir()
        except OSError:
            return


def read_json(path: Path, what: str) -> Any:
    """A JSON file the harness wrote; a damaged one is a one-line error naming it."""
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DamagedFileError(f"{path} ({what}) is damaged ({e.__class__.__name__}: {str(e)[:80]}); delete the run "
                               "folder to start over, or restore the file") from e


def read_run_config(run_dir: Path) -> dict | None:
    path = run_dir / RUN_CONFIG
    if not path.exists():
        return None
    data = read_json(path, "the config of the run in this folder")
    if not isinstance(data, dict) or not isinstance(data.get("dataset"), dict):
        raise DamagedFileError(f"{path} is not a run config; delete the run folder to start over")
    return data


def result_config(cfg: DictConfig) -> dict:
    """The resolved config minus the keys that do not change results (written as run_config.json)."""
    container = OmegaConf.to_container(cfg, resolve=True)
    for key in RESUME_FREE_KEYS:
        container.pop(key, None)
    return container


def is_path_key(key: str) -> bool:
    leaf = key.rsplit(".", 1)[-1]
    return leaf in PATH_KEYS or leaf.endswith(PATH_SUFFIXES)


def without_places(node: Any) -> Any:
    """``node`` without the keys that name places (for cache keys and comparisons that must survive a move)."""
    if isinstance(node, dict):
        return {k: without_places(v) for k, v in node.items() if not is_path_key(k)}
    return node


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(node, dict):
        return {prefix: node}
    flat: dict[str, Any] = {}
    for k, v in node.items():
        flat.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return flat


def comparable(config: dict) -> dict[str, Any]:
    """The flattened config that two runs of one folder must share: no fingerprints, no places."""
    return {k: v for k, v in flatten({k: v for k, v in config.items() if k != "fingerprints"}).items()
            if not is_path_key(k)}


def check_resumable(run_dir: Path, cfg: DictConfig, previous: dict | None) -> None:
    """A run folder holds one config: resuming with a different one would mix results."""
    if previous is None:
        return
    old, now = comparable(previous), comparable(result_config(cfg))
    if old != now:
        diff = sorted(k for k in set(old) | set(now) if old.get(k) != now.get(k))
        shown = ", ".join(diff[:6]) + (f" and {len(diff) - 6} more" if len(diff) > 6 else "")
        raise RunFolderError(f"{run_dir} already holds a run with a different config (differs in {shown}); "
                             "delete that folder or choose another with hydra.run.dir=...")
    if not cfg.resume:
        raise RunFolderError(f"{run_dir} already holds this run and resume=false; delete the folder to start over")


def check_fingerprints(run_dir: Path, previous: dict | None, now: dict, where: dict[str, str]) -> None:
    """Refuse to resume when a weights or annotation file changed content since the folder was started."""
    if previous is None or not isinstance(previous.get("fingerprints"), dict):
        return
    diff = changed(previous["fingerprints"], now, where)
    if diff:
        raise IntegrityError(f"{'; '.join(diff)} changed since the run in {run_dir} was started, so resuming would "
                             "mix results; restore the file, or start a new run folder (hydra.run.dir=...)")


def write_run_config(run_dir: Path, cfg: DictConfig, fingerprints: dict) -> None:
    """Written once, after everything is built: a failed first start leaves no claim on the folder."""
    from evaluators.results import write_json_atomic

    path = run_dir / RUN_CONFIG
    if not path.exists():
        write_json_atomic(path, {**result_config(cfg), "fingerprints": fingerprints})


def save_hydra_record(run_dir: Path, cfg: DictConfig) -> None:
    """Hydra's ``.hydra/`` record (config, overrides, Hydra's config), written only once the run is accepted
    (``hydra.output_subdir`` is null, so Hydra itself does not write it before the checks)."""
    from hydra.core.hydra_config import HydraConfig

    from evaluators.results import write_text_atomic

    if not HydraConfig.initialized():
        return
    hc = HydraConfig.get()
    folder = run_dir / ".hydra"
    folder.mkdir(exist_ok=True)
    write_text_atomic(folder / "config.yaml", OmegaConf.to_yaml(cfg))
    write_text_atomic(folder / "overrides.yaml", OmegaConf.to_yaml(hc.overrides.task))
    write_text_atomic(folder / "hydra.yaml", OmegaConf.to_yaml(OmegaConf.create({"hydra": hc})))
