"""Check a data root, convert what needs converting, and write the evaluated-subset manifests every run reuses.

    python scripts/prepare_data.py [DATA_ROOT] [--datasets coco vqav2 ...] [n_samples=500] [seed.subset=42]

DATA_ROOT (default: ``paths.data_dir``, i.e. $DIFFCAP_DATA or ./data) holds one folder per data set
(``coco/``, ``flickr30k/``, ``vqav2/``, ``textvqa/``, ``caltech101/``, ``imagenet/``), laid out as the
dataset configs describe. For each data set the script runs its conversion (ImageNet: flat official val
folder -> ``val/<wnid>/``), lists every missing file with where users officially get it, loads the
annotation files (one line naming the file and field when one is malformed), checks the train files
OpenFlamingo's demonstrations need, and writes ``<root>/<data set>/manifests/<task>_n<N>_seed<S>.json``
(``n_samples=null``: the whole split). Runs with the same ``n_samples`` and ``seed.subset`` then evaluate
exactly those samples, so CIDEr's idf is shared between runs. Exit status: 0 when everything is
present, 1 when something is missing or malformed, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from evaluators.config import compose_config
from evaluators.datasets import manifests
from evaluators.errors import DataError, cli, one_line, user_error

REAL_DATASETS = ("coco", "flickr30k", "vqav2", "textvqa", "caltech101", "imagenet")


def missing_files(cfg: DictConfig) -> list[dict[str, Any]]:
    """The entries of ``dataset.files`` that are absent (a folder must also hold something)."""
    root = Path(cfg.dataset.root)
    out = []
    for spec in cfg.dataset.get("files") or []:
        path = root / spec.path
        present = path.is_dir() and any(path.iterdir()) if spec.get("dir") else path.is_file()
        if not present:
            out.append({"path": f"{spec.path}/" if spec.get("dir") else str(spec.path), "for": spec.get("for"),
                        "source": spec.source})
    return out


def demonstration_files(cfg: DictConfig) -> set[str]:
    """The files OpenFlamingo's demonstrations read (``for`` mentions them)."""
    return {f"{s.path}/" if s.get("dir") else str(s.path)
            for s in cfg.dataset.get("files") or [] if "demonstrations" in str(s.get("for"))}


def prepare(cfg: DictConfig) -> list[str]:
    """Prepare one data set; returns its report lines, the problems first prefixed with ``-``."""
    name, root = cfg.dataset.name, Path(cfg.dataset.root)
    problems: list[str] = []
    notes: list[str] = []
    if cfg.dataset.get("convert") is not None:
        result = instantiate(cfg.dataset.convert)
        if result["status"] == "converted":
            notes.append(f"converted {result['n']} images into {cfg.dataset.convert.out}/")
        elif result["status"] == "missing":
            notes.append("cannot build val/ yet: missing " + "; ".join(result["missing"]))
    absent = missing_files(cfg)
    problems += [f"- missing {m['path']} (needed for {m['for']}): {m['source']}" for m in absent]
    if any(m["for"] != "demonstrations" for m in absent):
        return [f"{name}: INCOMPLETE under {root}", *problems, *notes]
    demo_files = demonstration_files(cfg)
    check_demos = bool(demo_files) and not demo_files & {m["path"] for m in absent}
    for task, spec in cfg.dataset.tasks.items():
        source = instantiate(spec.source)
        if check_demos:
            notes.append(f"{task}: {len(source.demonstrations())} train demonstrations")
        n = None if cfg.n_samples is None else int(cfg.n_samples)
        if cfg.dataset.get("manifests") is None:
            raise DataError(f"dataset={name} has no 'manifests' folder in its config; nothing to prepare")
        path = manifests.write_prepared(cfg.dataset.manifests, source, task, n, int(cfg.seed.subset))
        record = manifests.draw(source, task, n, int(cfg.seed.subset))
        lost = [i for i in record["ids"] if not Path(source.get(i)["image_path"]).is_file()]
        if lost:
            problems.append(f"- missing {len(lost)} of the {record['n']} evaluated {task} images, e.g. "
                            f"{source.get(lost[0])['image_path']}")
        notes.append(f"{task}: {path.relative_to(root)} ({record['n']} of {record['of']}, from {record['pool']})")
    status = "INCOMPLETE" if problems else "ok"
    return [f"{name}: {status} under {root}", *problems, *notes]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", nargs="?", type=Path, help="data root (default: paths.data_dir)")
    parser.add_argument("--datasets", nargs="+", default=list(REAL_DATASETS), metavar="NAME")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. n_samples=null seed.subset=42")
    args, extra = parser.parse_known_args(argv)
    overrides = [*args.overrides, *extra, *(d for d in args.datasets if "=" in d)]
    args.datasets = [d for d in args.datasets if "=" not in d]
    if args.root is not None and "=" in str(args.root):
        overrides.insert(0, str(args.root))
        args.root = None
    if args.root is not None:
        if not args.root.is_dir():
            print(f"error: data root {args.root} is not a folder", file=sys.stderr)
            return 2
        overrides.append(f"paths.data_dir={args.root.resolve()}")
    config_dir = Path(__file__).resolve().parents[1] / "configs" / "dataset"
    unknown = [d for d in args.datasets if not (config_dir / f"{d}.yaml").is_file()]
    if unknown:
        print(f"error: no dataset config {unknown[0]!r}; choose from {list(REAL_DATASETS)}", file=sys.stderr)
        return 2
    failed = False
    for name in args.datasets:
        try:
            cfg = compose_config([f"dataset={name}", *overrides], model=False)
            OmegaConf.resolve(cfg.dataset)
            lines = prepare(cfg)
        except Exception as e:  # a malformed file or a bad override: one line, then the next data set
            cause = user_error(e)
            if cause is None and not isinstance(e, (DataError, ValueError, KeyError)):
                raise
            lines = [f"{name}: ERROR: {one_line(cause or e)}"]
        failed |= not lines[0].split(": ", 1)[1].startswith("ok")
        print("\n  ".join(lines))
    if failed:
        print("some data sets are incomplete: fetch the files listed above (re-run this script afterwards)",
              file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    cli(lambda: sys.exit(main()))
