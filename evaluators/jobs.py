"""Multirun bookkeeping: a failing job (out of memory, bad data, a bug) is recorded and the sweep goes on.

Each job of a multirun writes ``job_status.json`` into its output folder: ``{"status": "ok"}`` or
``{"status": "error", "error": "<one line>", "type": ..., "traceback": ...}``. Hydra's sweepers stop at
the first raised exception, so in a multirun the task function records the failure and returns; the
``SweepReport`` callback then lists the failed jobs at the end of the sweep and exits with status 1.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

log = logging.getLogger(__name__)
STATUS = "job_status.json"


def in_multirun() -> bool:
    """True inside a job of ``python run.py -m ...``."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def record(output_dir: str | Path, status: dict) -> None:
    if in_multirun():  # whose sweep this job is (another sweep may write into a subfolder at the same time)
        status = {**status, "sweep_dir": str(Path(str(HydraConfig.get().sweep.dir)).resolve())}
    path = Path(output_dir) / STATUS
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(status, indent=2))


def guarded(fn: Callable[[], Any], output_dir: str | Path) -> Any:
    """Run ``fn``; in a multirun record its failure (the one-line user error, or the exception's first line)
    instead of raising, so the other jobs run. Outside a multirun, errors propagate."""
    from evaluators.errors import one_line, user_error

    if not in_multirun():
        return fn()
    try:
        out = fn()
    except Exception as e:  # noqa: BLE001 (every failure of one job is recorded, the sweep goes on)
        cause = user_error(e)
        line = one_line(cause) if cause is not None else f"{type(e).__name__}: {one_line(e)}"
        record(output_dir, {"status": "error", "error": line,
                            "type": type(e).__name__, "traceback": traceback.format_exc()})
        log.error("job failed (recorded in %s): %s", Path(output_dir) / STATUS, line)
        return None
    record(output_dir, {"status": "ok"})
    return out


class SweepReport(Callback):
    """At the end of a multirun: the jobs' table rows side by side, one line per failed job, and exit status 1
    if any failed."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.started = time.time()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from evaluators.runner import format_table

        root = Path(str(config.hydra.sweep.dir))
        # this sweep's jobs only: the sweep folder may hold earlier sweeps' jobs (every job rewrites its status)
        # and, in subfolders, the jobs of another sweep running at the same time (each status names its sweep)
        since = getattr(self, "started", 0.0) - 1.0
        files = sorted((p for p in root.rglob(STATUS) if p.stat().st_mtime >= since), key=lambda p: p.stat().st_mtime)
        statuses = {p.parent: json.loads(p.read_text()) for p in files}  # in the order the jobs ended
        mine = str(root.resolve())
        statuses = {d: s for d, s in statuses.items() if s.get("sweep_dir", mine) == mine}
        summaries = {}
        for d, s in statuses.items():
            try:
                if s.get("status") == "ok":
                    summaries[str(d.relative_to(root))] = json.loads((d / "summary.json").read_text())
            except (OSError, ValueError):  # a job's damaged summary is its own business; the table skips it
                continue
        if len(summaries) > 1:
            print(f"all jobs of the sweep ({root}):" + format_table(summaries))
        failed = {d: s for d, s in statuses.items() if s.get("status") != "ok"}
        if not failed:
            return
        for d, s in failed.items():
            print(f"error: job {d.relative_to(root)} failed: {s.get('error')}", file=sys.stderr)
        print(f"error: {len(failed)} of {len(statuses)} jobs failed (details in their {STATUS}); "
              "the others completed", file=sys.stderr)
        sys.exit(1)
