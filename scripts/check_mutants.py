"""Applies deliberate bugs (mutants) one at a time and reports whether the test suite catches each one.

Each ``tests/mutants/*.yaml`` file is a list of ``{name, file, find, replace, tests}``: ``find`` must occur
exactly once in ``file`` (a path relative to the project root), ``tests`` lists pytest node ids or files.
For each mutant the file is patched in place, ``python -m pytest -x -q <tests>`` runs with this interpreter,
and the original bytes are restored whatever happens. A mutant is *caught* when pytest fails (exit status
1); any other status (no tests collected, usage error, interrupted) is reported as an error. A file with
uncommitted changes is refused, so a crash can never lose work: ``git checkout <file>`` restores it.

    python scripts/check_mutants.py                      # every tests/mutants/*.yaml
    python scripts/check_mutants.py tests/mutants/attacks.yaml --only apgd-no-momentum

Writes the table to stdout and ``results/mutants/<yaml stem>.json``; exit status 1 when a mutant survives.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ("name", "file", "find", "replace", "tests")


class MutantError(ValueError):
    """A mutant definition that cannot be applied as written."""


def load_mutants(path: Path) -> list[dict]:
    items = yaml.safe_load(path.read_text())
    if not isinstance(items, list):
        raise MutantError(f"{path}: expected a list of mutants")
    names = set()
    for i, m in enumerate(items):
        missing = [f for f in FIELDS if f not in (m or {})]
        if missing:
            raise MutantError(f"{path}: mutant {i} lacks {', '.join(missing)}")
        if m["name"] in names:
            raise MutantError(f"{path}: duplicate mutant name {m['name']!r}")
        names.add(m["name"])
        if not isinstance(m["tests"], list) or not m["tests"]:
            raise MutantError(f"{path}: mutant {m['name']!r}: tests must be a non-empty list")
        if m["find"] == m["replace"]:
            raise MutantError(f"{path}: mutant {m['name']!r}: replace equals find")
    return items


def is_dirty(file: Path) -> bool:
    out = subprocess.run(["git", "status", "--porcelain", "--", str(file)], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    return bool(out.strip())


def run_mutant(m: dict, timeout: int) -> dict:
    """Apply one mutant, run its tests, restore the file; returns the row of the report."""
    file = ROOT / m["file"]
    if not file.is_file():
        raise MutantError(f"mutant {m['name']!r}: no file {m['file']}")
    if is_dirty(file):
        raise MutantError(f"mutant {m['name']!r}: {m['file']} has uncommitted changes; commit or stash them first")
    original = file.read_bytes()
    text = original.decode()
    count = text.count(m["find"])
    if count != 1:
        raise MutantError(f"mutant {m['name']!r}: the find string occurs {count} times in {m['file']} (must be once)")
    tic = time.perf_counter()
    try:
        file.write_bytes(text.replace(m["find"], m["replace"]).encode())
        try:
            proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *m["tests"]],
                                  cwd=ROOT, capture_output=True, text=True, timeout=timeout)
            rc, tail = proc.returncode, (proc.stdout + proc.stderr).strip().splitlines()[-1:]
        except subprocess.TimeoutExpired:
            rc, tail = -1, ["timeout"]
    finally:
        file.write_bytes(original)
    status = {0: "SURVIVED", 1: "caught"}.get(rc, "error")
    return {"name": m["name"], "file": m["file"], "status": status, "pytest_exit": rc,
            "seconds": round(time.perf_counter() - tic, 1), "last_line": tail[0] if tail else ""}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="*", type=Path, help="mutant YAML files (default: tests/mutants/*.yaml)")
    ap.add_argument("--only", nargs="*", default=None, help="run only these mutant names")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per mutant's test run")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "mutants")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill still restores the mutated file (finally)
    files = args.files or sorted((ROOT / "tests" / "mutants").glob("*.yaml"))
    if not files:
        print("error: no mutant files (tests/mutants/*.yaml)", file=sys.stderr)
        return 2
    try:
        plans = [(f, load_mutants(f)) for f in files]
    except (MutantError, OSError, yaml.YAMLError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    survived = 0
    for f, mutants in plans:
        chosen = [m for m in mutants if args.only is None or m["name"] in args.only]
        rows: list[dict] = []
        args.out.mkdir(parents=True, exist_ok=True)
        report = args.out / f"{f.stem}.json"
        for m in chosen:
            try:
                row = run_mutant(m, args.timeout)
            except MutantError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
            rows.append(row)
            print(f"{row['status']:<9} {row['name']:<40} {row['seconds']:>7.1f}s  {row['last_line'][:70]}", flush=True)
            # rewritten after every mutant, so an interrupted run keeps what it measured
            report.write_text(json.dumps({"file": _relative(f), "rows": rows}, indent=1) + "\n")
        survived += sum(r["status"] != "caught" for r in rows)
        caught = sum(r["status"] == "caught" for r in rows)
        print(f"{f.name}: {caught} of {len(rows)} mutants caught\n")
    return 1 if survived else 0


def _relative(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


if __name__ == "__main__":
    sys.exit(main())
