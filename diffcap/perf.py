"""Speed options and the arithmetic of evaluation bounds, shared by the purifiers and the benchmarks.

Why one module: the benchmark's claim "measured time / evaluation bound" is only as good as its bound, so the
bound's arithmetic (which batched calls a grouped pass makes, what they cost) lives here, with tests, and the
scripts only time things. The speed options (autocast precision) are parsed here so that the denoiser and DiffCAP's
encoder accept exactly the same values.
"""

from __future__ import annotations

import contextlib
import re
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import torch

#: autocast precisions a config may name (null = no autocast)
AUTOCAST: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def autocast_dtype(name: str | None, key: str = "autocast") -> torch.dtype | None:
    """The torch dtype of an autocast config value; None and "none" mean no autocast."""
    if name is None or name == "none":
        return None
    if name not in AUTOCAST:
        raise ValueError(f"{key} must be null or one of {sorted(AUTOCAST)}, got {name!r}")
    return AUTOCAST[name]


def autocast(device_type: str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``dtype``, or nothing when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)


def no_grad_context(inference_mode: bool) -> contextlib.AbstractContextManager:
    """``torch.inference_mode()`` when asked (no autograd bookkeeping at all), else ``torch.no_grad()``."""
    return torch.inference_mode() if inference_mode else torch.no_grad()


# --------------------------------------------------------------------------------------------- bounds


def call_sizes(evals: Sequence[int]) -> list[int]:
    """Batch size of each network call of a grouped pass in which image i takes part in ``evals[i]`` calls.

    The samplers (``diffcap.samplers._walk``) and DiffCAP's walk call the network once per round on exactly the
    images still active, and an image is active in its first ``evals[i]`` rounds counted from its end (or start):
    round c holds every image with ``evals[i] >= c``. Images with 0 evaluations take part in no call.
    """
    if any(int(e) < 0 for e in evals):
        raise ValueError(f"evaluation counts must be >= 0, got {list(evals)}")
    counts = [int(e) for e in evals]
    return [sum(e >= c for e in counts) for c in range(1, max(counts, default=0) + 1)]


#: how DiffCAP's reverse pass groups images (``defense.reverse_grouping``): "rounds" (one pass, every round on all
#: images still active), "start" (one pass per distinct start time) or "image" (one pass each)
REVERSE_GROUPINGS = ("rounds", "start", "image")


def reverse_groups(starts: Sequence[float], grouping: str) -> list[list[int]]:
    """The rows of a batch that share one reverse pass under ``grouping``, in order of first appearance (the
    purifier runs these passes, the bound counts their calls)."""
    if grouping not in REVERSE_GROUPINGS:
        raise ValueError(f"grouping must be one of {', '.join(REVERSE_GROUPINGS)}, got {grouping!r}")
    keys = [0] * len(starts) if grouping == "rounds" else list(starts) if grouping == "start" else range(len(starts))
    groups: dict[object, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def grouped_call_sizes(evals: Sequence[int], starts: Sequence[float], grouping: str) -> list[int]:
    """Call sizes of a reverse pass over one batch grouped as DiffCAP's ``reverse_grouping``
    (``reverse_groups``): each group's pass calls the network as ``call_sizes`` says."""
    if len(evals) != len(starts):
        raise ValueError(f"{len(evals)} evaluation counts for {len(starts)} start times")
    return [n for rows in reverse_groups(starts, grouping) for n in call_sizes([evals[i] for i in rows])]


def bound_seconds(sizes: Sequence[int], unit: Mapping[int, float]) -> float:
    """The evaluation bound of calls of these batch sizes: the sum of one batched evaluation's time per call."""
    missing = sorted({n for n in sizes if n not in unit})
    if missing:
        raise KeyError(f"no unit time measured for batch size(s) {missing}")
    return float(sum(unit[n] for n in sizes))


def packed_bound(total_evals: int, batch: int, seconds_at_batch: float) -> float:
    """The bound if every evaluation ran in a full batch: image evaluations x (time of a batch / batch size)."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    return float(total_evals) * seconds_at_batch / batch


def ratio(numerator: float, denominator: float) -> float | None:
    """numerator / denominator, None when the denominator is 0 (nothing to compare with)."""
    return None if denominator == 0 else float(numerator) / float(denominator)


# --------------------------------------------------------------------------------------------- timing


def synchronize(device: torch.device | str | None) -> None:
    """Wait for queued GPU work, so wall-clock timers measure it."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], repeats: int = 3, warmup: int = 1,
                   device: torch.device | str | None = None) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls after ``warmup`` untimed ones."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        tic = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


_HWM = re.compile(r"^VmHWM:\s+(\d+)\s+kB", re.M)
_RSS = re.compile(r"^VmRSS:\s+(\d+)\s+kB", re.M)


@contextlib.contextmanager
def peak_memory(device: torch.device | str) -> Iterator[dict[str, float | str | None]]:
    """Peak memory of the block in MiB (``peak_mib``) and what was held when it began (``base_mib``): CUDA's
    allocations on a GPU; on Linux CPUs the process's resident set (peak: ``VmHWM``, reset through
    ``/proc/self/clear_refs``), which counts everything the process holds (Python, libraries, weights), so
    compare peak - base between blocks of one process, not across machines."""
    out: dict[str, float | str | None] = {"peak_mib": None, "base_mib": None, "kind": None}
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        out["base_mib"] = torch.cuda.memory_allocated(dev) / 2**20
        yield out
        torch.cuda.synchronize(dev)
        out.update(peak_mib=torch.cuda.max_memory_allocated(dev) / 2**20, kind="cuda_max_allocated")
        return
    status, clear = Path("/proc/self/status"), Path("/proc/self/clear_refs")
    try:
        clear.write_text("5")
        reset = True
    except OSError:
        reset = False
    rss = _RSS.search(status.read_text()) if status.exists() else None
    out["base_mib"] = int(rss.group(1)) / 1024 if rss else None
    yield out
    if status.exists():
        m = _HWM.search(status.read_text())
        if m:
            out.update(peak_mib=int(m.group(1)) / 1024,
                       kind="process_peak_rss" if reset else "process_peak_rss_since_start")


class UnitTable:
    """Median time of one batched evaluation per batch size, measured again whenever asked.

    Why: a bound is only comparable with a measured time when both were measured under the same machine load,
    so the benchmark re-measures the unit right after each block of timed runs, and ``unit`` averages that with
    the measurement before the block (the previous one).
    """

    def __init__(self, make_call: Callable[[int], Callable[[], object]], repeats: int = 3,
                 device: torch.device | str | None = None):
        self.make_call, self.repeats, self.device = make_call, repeats, device
        self.history: dict[int, list[float]] = {}

    def measure(self, sizes: Sequence[int]) -> None:
        """Time one call at each distinct batch size in ``sizes`` (one warm-up call each)."""
        for n in sorted(set(int(s) for s in sizes)):
            seconds = median_seconds(self.make_call(n), self.repeats, warmup=1, device=self.device)
            self.history.setdefault(n, []).append(seconds)

    def unit(self, sizes: Sequence[int] | None = None) -> dict[int, float]:
        """Per batch size: the mean of its last two measurements (before and after a block), or its only one."""
        keys = self.history if sizes is None else sorted(set(int(s) for s in sizes))
        return {n: statistics.fmean(self.history[n][-2:]) for n in keys}
