"""What the bad-input tests share: the context of a case (a copy of a finished good run), running ``run.py``'s
work in-process, hashing a folder, and the one error line."""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from evaluators.config import compose_config
from evaluators.errors import report
from evaluators.runner import run

ROOT = Path(__file__).resolve().parents[1]
SMALL_WORLD = ["dataset.prepare.n_train=8", "dataset.prepare.n_test=48"]
GOOD = ["experiment=fast_dev", "tasks=[vqa]", "attack=apgd", "attack.steps=2"]


@dataclass
class Ctx:
    run: Path       # a copy of a finished good run folder, the output folder of every case
    world: Path     # the data folder of the good run (never modified)
    tmp: Path
    cache: Path
    out: Path | None = None  # where the case runs, if not in ``run`` (a fresh folder, for other tasks)
    other_dataset: bool = False  # the shapes world's size overrides do not apply
    builds: bool = False  # the case fails after the run was built (so run_config.json is written)

    def base(self) -> list[str]:
        return [*GOOD, *([] if self.other_dataset else SMALL_WORLD), f"paths.data_dir={self.world}",
                f"paths.cache_dir={self.cache}"]


def invoke(overrides: list[str], out: Path, capsys) -> tuple[int, str]:
    """What ``python run.py`` does, in-process: report() re-raises anything that is not a user error, so a bug
    fails the test with its traceback instead of passing as 'an error'."""
    capsys.readouterr()
    try:
        run(compose_config(overrides, output_dir=out))
        code = 0
    except Exception as e:  # noqa: BLE001
        code = report(e)
    return code, capsys.readouterr().err


def tree_hash(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def make_good_run(base: Path) -> tuple[Path, Path, Path]:
    """(world, finished run folder, cache) made once by an in-process run."""
    from evaluators.datasets.shapes import generate_shapes

    generate_shapes(base / "data" / "shapes", n_train=8, n_test=48, size=64, seed=0)
    torch.set_num_threads(1)
    run(compose_config([*GOOD, *SMALL_WORLD, f"paths.data_dir={base / 'data'}", f"paths.cache_dir={base / 'cache'}"],
                       output_dir=base / "run"))
    assert (base / "run" / "summary.json").exists()
    return base / "data", base / "run", base / "cache"


def copy_good_run(good: tuple[Path, Path, Path], tmp: Path) -> Ctx:
    world, run_dir, cache = good
    shutil.copytree(run_dir, tmp / "run")
    return Ctx(run=tmp / "run", world=world, tmp=tmp, cache=cache)
