"""The evaluated subset of a task: drawn once per data set, written as a prepared manifest, reused by every run.

Why: CIDEr's idf comes from the evaluated reference set, so two runs are only comparable when they score
the same images. ``scripts/prepare_data.py`` writes ``<dataset.manifests>/<task>_n<N>_seed<S>.json``
(``n_all`` for the whole split); a run with the same ``n_samples`` and ``seed.subset`` finds it and checks
that its own draw gives exactly those ids (a changed annotation file or image folder is an error, not a
silently different subset). Without a prepared manifest a run draws the subset itself, the same way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from evaluators.datasets.base import DataError, SampleSource
from evaluators.seeding import select_subset


def manifest_file(directory: str | Path, task: str, n_samples: int | None, seed: int) -> Path:
    """Where the prepared manifest of (task, n_samples, seed) lives; ``n_samples=None`` is the whole split."""
    n = "all" if n_samples is None else int(n_samples)
    return Path(directory) / f"{task}_n{n}_seed{int(seed)}.json"


def draw(source: SampleSource, task: str, n_samples: int | None, seed: int) -> dict[str, Any]:
    """The manifest of the subset: ``n_samples`` ids (all with None) of ``source`` drawn with ``seed``."""
    ids = source.ids
    n = len(ids) if n_samples is None else int(n_samples)
    subset = select_subset(ids, n, int(seed))
    return {"task": task, "n_samples": n_samples, "seed": int(seed), "n": len(subset), "of": len(ids),
            "pool": source.pool, "ids": subset}


def write_prepared(directory: str | Path, source: SampleSource, task: str, n_samples: int | None,
                   seed: int) -> Path:
    """Write (or confirm) the prepared manifest; an existing one with other ids is never overwritten."""
    record = draw(source, task, n_samples, seed)
    path = manifest_file(directory, task, n_samples, seed)
    if path.exists():
        check(path, record)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)
    return path


def check(path: Path, record: dict[str, Any]) -> None:
    """The prepared manifest at ``path`` must list exactly ``record['ids']``."""
    try:
        prepared = json.loads(path.read_text())
        ids = prepared["ids"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"prepared manifest {path} is unreadable or lacks the field 'ids' ({e!r}); "
                        "delete it and run scripts/prepare_data.py again") from e
    if ids != record["ids"]:
        n = "null" if record["n_samples"] is None else record["n_samples"]
        raise DataError(f"prepared manifest {path} lists other {record['task']} samples than the data set gives "
                        f"for n_samples={n}, seed={record['seed']} (the annotation files or "
                        "image folders changed); restore the data or delete the manifest and prepare again")


def evaluated_subset(source: SampleSource, task: str, n_samples: int | None, seed: int,
                     directory: str | Path | None) -> dict[str, Any]:
    """A run's manifest: the drawn subset, checked against the prepared manifest when there is one."""
    record = draw(source, task, n_samples, seed)
    path = manifest_file(directory, task, n_samples, seed) if directory else None
    if path is not None and path.exists():
        check(path, record)
    record["prepared"] = str(path) if path is not None and path.exists() else None
    return record
