"""Classification samples in torchvision's ImageFolder layout: ``root/<class folder>/<image>``.

Labels are indices into the sorted class-folder names (torchvision's convention, so ImageNet's wnid
folders give the standard class order). Zero-shot classification needs readable names: ``classnames_file``
holds one name per line, line i naming the i-th folder in sorted order (ImageNet wnids -> "tench", ...);
without it the folder names are used with "_" turned into spaces.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from evaluators.datasets.base import DataError, SampleSource, require_dir, require_file

log = logging.getLogger(__name__)


def read_classnames(path: str | Path, n_classes: int) -> list[str]:
    """One class name per non-empty line; the count must match the class folders."""
    p = require_file(path, "class-names file (one readable name per line, in sorted folder order)")
    names = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(names) != n_classes:
        raise DataError(f"{p} lists {len(names)} class names but there are {n_classes} class folders; "
                        "write one name per folder, in sorted folder order")
    return names


class ImageFolderClasses(SampleSource):
    """Images with integer labels. Ids are ``"<class folder>/<file stem>"``, sorted by folder then file
    name (torchvision's ``make_dataset`` order)."""

    def __init__(self, root: str | Path, classnames_file: str | Path | None = None):
        self.root = require_dir(root, "image-folder data set root (root/<class>/<image>)")
        try:
            self.folders, class_to_idx = find_classes(str(self.root))
        except FileNotFoundError as e:
            raise DataError(f"no class folders under {self.root}; put one folder of images per class there") from e
        # empty class folders are allowed (a small subset may miss classes): the label space stays all folders
        items = make_dataset(str(self.root), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
        if not items:
            raise DataError(f"no images ({', '.join(IMG_EXTENSIONS)}) in the class folders under {self.root}")
        empty = len(self.folders) - len({label for _, label in items})
        if empty:
            log.warning("%d of %d class folders under %s hold no image", empty, len(self.folders), self.root)
        if classnames_file is not None:
            self.classnames: list[str] = read_classnames(classnames_file, len(self.folders))
        else:
            self.classnames = [f.replace("_", " ") for f in self.folders]
        self._samples: dict[str, tuple[str, int]] = {}
        for path, label in items:
            sid = f"{self.folders[label]}/{Path(path).stem}"
            if sid in self._samples:
                raise DataError(f"two images share the id {sid!r} (same name, different extension) under {self.root}")
            self._samples[sid] = (path, label)
        self._ids = list(self._samples)
        log.info("%s: %d images in %d classes", self.root, len(self._ids), len(self.folders))

    @property
    def ids(self) -> list[str]:
        return list(self._ids)

    def get(self, sample_id: str) -> dict[str, Any]:
        if sample_id not in self._samples:
            raise KeyError(f"no image {sample_id!r} under {self.root}")
        path, label = self._samples[sample_id]
        return {"id": sample_id, "image_path": path, "label": label}
