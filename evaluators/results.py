"""Per-run files: ``samples.jsonl`` (one record per sample, appended per batch), manifests and ``summary.json``.

A batch's records are written with one ``write`` and fsync'd, and each record carries its batch index, so a run
killed mid-write resumes by dropping the records of incomplete batches and redoing exactly those batches.
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SAMPLES = "samples.jsonl"
SUMMARY = "summary.json"


def manifest_path(run_dir: Path, task: str) -> Path:
    return run_dir / f"manifest_{task}.json"


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str))
    os.replace(tmp, path)


def read_records(path: Path) -> list[dict]:
    """All complete JSON lines; a torn last line (killed mid-write) is skipped."""
    if not path.exists():
        return []
    records = []
    with path.open() as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("skipping a torn line in %s (the run was interrupted while writing)", path)
    return records


class RecordWriter:
    """Appends the records of one batch at a time to samples.jsonl."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / SAMPLES

    def write_batch(self, records: list[dict]) -> None:
        text = "".join(json.dumps(r, default=str) + "\n" for r in records)
        with self.path.open("a") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def completed_batches(run_dir: Path, task: str, expected: dict[int, int]) -> set[int]:
    """Indices of ``task``'s batches whose records are all on disk; rewrites samples.jsonl without the
    records of that task's partial batches (other tasks' records are kept as they are).

    ``expected`` maps a batch index to the number of samples in that batch.
    """
    path = run_dir / SAMPLES
    records = read_records(path)
    by_batch: dict[int, set[str]] = defaultdict(set)
    for r in records:
        if r["task"] == task:
            by_batch[int(r["batch"])].add(r["id"])
    done = {b for b, ids in by_batch.items() if expected.get(b) == len(ids)}
    keep = [r for r in records if r["task"] != task or int(r["batch"]) in done]
    if len(keep) != len(records) or (path.exists() and _has_torn_line(path)):
        dropped = len(records) - len(keep)
        log.info("resume: dropping %d records of unfinished batches; they are recomputed", dropped)
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r, default=str) + "\n" for r in keep))
        os.replace(tmp, path)
    return done


def _has_torn_line(path: Path) -> bool:
    data = path.read_bytes()
    return bool(data) and not data.endswith(b"\n")
