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


def write_text_atomic(path: Path, text: str) -> None:
    """Write through a temporary file that is fsync'd and renamed, so a kill never leaves half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=str))


def _valid(record: Any) -> bool:
    return (isinstance(record, dict) and isinstance(record.get("task"), str) and isinstance(record.get("id"), str)
            and isinstance(record.get("batch"), int) and record.get("status") in ("ok", "error"))


def read_records(path: Path) -> list[dict]:
    """All complete, well-formed records; a torn or damaged line is skipped with a warning naming it (its batch
    then counts as unfinished and is recomputed on resume)."""
    if not path.exists():
        return []
    records = []
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                record = None
            if _valid(record):
                records.append(record)
            elif raw.strip():
                log.warning("skipping a damaged line %d of %s (torn by an interrupted write, or edited)", n, path)
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
    """Indices of ``task``'s batches whose records are all on disk and ok; rewrites samples.jsonl without the
    records of that task's other batches (partial, or with samples that failed to load: those are retried),
    keeping other tasks' records as they are.

    ``expected`` maps a batch index to the number of samples in that batch.
    """
    path = run_dir / SAMPLES
    records = read_records(path)
    by_batch: dict[int, set[str]] = defaultdict(set)
    for r in records:
        if r["task"] == task:
            by_batch[int(r["batch"])].add(r["id"] if r["status"] == "ok" else "\x00error")
    done = {b for b, ids in by_batch.items() if expected.get(b) == len(ids) and "\x00error" not in ids}
    keep = [r for r in records if r["task"] != task or int(r["batch"]) in done]
    if len(keep) != len(records) or (path.exists() and _n_lines(path) != len(records)):
        dropped = len(records) - len(keep)
        log.info("resume: dropping %d records of unfinished batches; they are recomputed", dropped)
        write_text_atomic(path, "".join(json.dumps(r, default=str) + "\n" for r in keep))
    return done


def _n_lines(path: Path) -> int:
    """Non-empty lines of a file, a torn last one included."""
    return sum(1 for line in path.read_bytes().splitlines() if line.strip())
