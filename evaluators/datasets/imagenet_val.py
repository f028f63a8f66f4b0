"""ImageNet-1k val from the flat official folder to ``val/<wnid>/<image>`` (torchvision's ImageFolder layout).

The 50000 val images are distributed flat (``ILSVRC2012_img_val.tar``: ``ILSVRC2012_val_00000001.JPEG`` ...;
Kaggle: ``ILSVRC/Data/CLS-LOC/val/``). Their labels come in one of two ground-truth forms, both supported:

- Kaggle's ``LOC_val_solution.csv``: header ``ImageId,PredictionString``; the first token of
  ``PredictionString`` (``n01751748 ...box...``) is the image's WordNet id;
- the ILSVRC2012 devkit (``ILSVRC2012_devkit_t12/``): ``data/ILSVRC2012_validation_ground_truth.txt`` holds
  one ILSVRC2012_ID (1..1000) per image in file-name order, and ``data/meta.mat`` maps ILSVRC2012_ID to
  WordNet id (leaf synsets, as torchvision's devkit parser reads it). Its ids are NOT the sorted-wnid class indices; only the
  wnid is used, and the class index follows from the sorted wnid list.

The conversion links (or copies) the images; it never moves or overwrites the originals, and writes into
``<out>.partial`` first, renamed to ``<out>`` only when complete.
"""

from __future__ import annotations

import csv
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from evaluators.datasets.base import DataError
from evaluators.datasets.labels import class_folders

log = logging.getLogger(__name__)

LINKS = ("symlink", "hardlink", "copy")
GROUND_TRUTH_TXT = "data/ILSVRC2012_validation_ground_truth.txt"
META_MAT = "data/meta.mat"


def labels_from_solution_csv(path: Path) -> dict[str, str]:
    """Image stem -> wnid from Kaggle's ``LOC_val_solution.csv``."""
    out: dict[str, str] = {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"ImageId", "PredictionString"} <= set(reader.fieldnames):
            raise DataError(f"{path} lacks the columns 'ImageId' and 'PredictionString' (header: {reader.fieldnames})")
        for n, row in enumerate(reader, 2):
            tokens = (row.get("PredictionString") or "").split()
            if not row.get("ImageId") or not tokens:
                raise DataError(f"{path} line {n}: empty field 'ImageId' or 'PredictionString' (truncated file?)")
            out[row["ImageId"]] = tokens[0]
    return out


def read_meta_mat(meta: Path) -> dict[int, str]:
    """ILSVRC2012_ID -> WNID of the 1000 leaf synsets (``num_children == 0``) in the devkit's ``meta.mat``."""
    import scipy.io

    try:
        synsets = scipy.io.loadmat(str(meta), squeeze_me=True)["synsets"]
        rows = [(int(s["ILSVRC2012_ID"]), str(s["WNID"]), int(s["num_children"])) for s in synsets]
    except Exception as e:  # scipy raises several types on a truncated or foreign .mat file
        raise DataError(f"{meta} is unreadable or lacks the field 'synsets' (ILSVRC2012_ID, WNID, num_children) "
                        f"({e!r}); re-extract the devkit") from e
    return {i: wnid for i, wnid, children in rows if children == 0}


def labels_from_devkit(devkit: Path, images: Sequence[Path]) -> dict[str, str]:
    """Image stem -> wnid from the devkit: ground-truth line i labels the i-th image in file-name order."""
    gt_file, meta = devkit / GROUND_TRUTH_TXT, devkit / META_MAT
    for p in (gt_file, meta):
        if not p.is_file():
            raise DataError(f"{p} not found; the ILSVRC2012 devkit (ILSVRC2012_devkit_t12.tar.gz) holds it")
    idx_to_wnid = read_meta_mat(meta)
    try:
        ids = [int(line) for line in gt_file.read_text().split()]
    except ValueError as e:
        raise DataError(f"{gt_file} must hold one integer ILSVRC2012_ID per line ({e})") from e
    if len(ids) != len(images):
        raise DataError(f"{gt_file} has {len(ids)} labels for the {len(images)} images of {images[0].parent}; "
                        "the folder or the file is incomplete")
    unknown = sorted({i for i in ids if i not in idx_to_wnid})
    if unknown:
        raise DataError(f"{gt_file}: ILSVRC2012_ID {unknown[0]} is not a leaf synset of {meta}")
    return {img.stem: idx_to_wnid[i] for img, i in zip(sorted(images), ids, strict=True)}


def _place(src: Path, dst: Path, link: str) -> None:
    if link == "symlink":
        os.symlink(src.resolve(), dst)
    elif link == "hardlink":
        os.link(src, dst)
    else:
        shutil.copy2(src, dst)


def convert_flat_val(
    root: str | Path,
    out: str = "val",
    flat_dirs: Sequence[str] = ("ILSVRC2012_img_val", "ILSVRC/Data/CLS-LOC/val"),
    solution_csv: str = "LOC_val_solution.csv",
    devkit_dir: str = "ILSVRC2012_devkit_t12",
    link: str = "symlink",
) -> dict[str, Any]:
    """Build ``root/out/<wnid>/`` from a flat val folder and its ground truth (paths relative to ``root``).

    Returns ``{"status": "present" | "converted" | "missing", "missing": [what is absent], "n": images}``;
    a ground-truth file that does not fit the images raises DataError.
    """
    if link not in LINKS:
        raise DataError(f"convert.link must be one of {LINKS}, got {link!r}")
    root = Path(root)
    target = root / out
    if target.is_dir():
        return {"status": "present", "missing": [], "n": None}
    flat = next((root / d for d in flat_dirs if (root / d).is_dir()), None)
    csv_path, devkit = root / solution_csv, root / devkit_dir
    missing = []
    if flat is None:
        missing.append(" or ".join(f"{d}/" for d in flat_dirs) + " (the flat val images)")
    if not csv_path.is_file() and not devkit.is_dir():
        missing.append(f"{solution_csv} or {devkit_dir}/ (the val ground truth)")
    if missing:
        return {"status": "missing", "missing": missing, "n": None}
    images = sorted(p for p in flat.iterdir() if p.suffix.lower() in (".jpeg", ".jpg", ".png"))
    if not images:
        raise DataError(f"{flat} holds no .JPEG images")
    labels = labels_from_solution_csv(csv_path) if csv_path.is_file() else labels_from_devkit(devkit, images)
    known = set(class_folders("imagenet1k"))
    partial = root / f"{out}.partial"
    if partial.exists():
        shutil.rmtree(partial)
    for img in images:
        wnid = labels.get(img.stem)
        source = csv_path.name if csv_path.is_file() else f"{devkit.name}/{GROUND_TRUTH_TXT}"
        if wnid is None:
            raise DataError(f"{source} has no label for {img.name}; the ground truth does not match {flat}")
        if wnid not in known:
            raise DataError(f"{source}: {wnid!r} (label of {img.name}) is not one of the 1000 ImageNet-1k wnids")
        (partial / wnid).mkdir(parents=True, exist_ok=True)
        _place(img, partial / wnid / img.name, link)
    partial.rename(target)
    log.info("converted %d val images from %s into %s (%s)", len(images), flat, target, link)
    return {"status": "converted", "missing": [], "n": len(images)}
