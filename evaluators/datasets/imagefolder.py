"""Classification samples in torchvision's ImageFolder layout: ``root/<class folder>/<image>``.

Two ways to fix which folder is which class:

- ``class_folders`` (a shipped list, e.g. the 1000 sorted ImageNet wnids or the 102 Caltech101 folders):
  the label of an image is the index of its folder in that list, so a copy holding only some class
  folders keeps the standard label space; a folder not in the list is an error (wrong data set).
  ``classnames`` then gives the readable name of every listed class (same length).
- no list: the sorted folder names present (torchvision's ``find_classes``), named by ``classnames_file``
  (one name per line, in sorted folder order) or by the folder names with "_" turned into spaces.

``templates`` (zero-shot prompt templates with a ``{}`` placeholder) travel with the source, since they
belong to the data set (80 for ImageNet, 34 for Caltech101). ``split_file`` optionally restricts the
samples to the images it lists (one ``<class folder>/<file name>`` per line, e.g. the VTAB Caltech101 test
split); without it every image is in the pool the evaluated subset is drawn from. ``pool`` says which.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
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
    """Images with integer labels. Ids are ``"<class folder>/<file stem>"``, sorted by class index then
    file name (torchvision's ``make_dataset`` order)."""

    def __init__(
        self,
        root: str | Path,
        classnames_file: str | Path | None = None,
        class_folders: Sequence[str] | None = None,
        classnames: Sequence[str] | None = None,
        templates: Sequence[str] | None = None,
        split_file: str | Path | None = None,
    ):
        self.root = require_dir(root, "image-folder data set root (root/<class>/<image>)")
        try:
            present, _ = find_classes(str(self.root))
        except FileNotFoundError as e:
            raise DataError(f"no class folders under {self.root}; put one folder of images per class there") from e
        if class_folders is not None:
            self.folders = [str(f) for f in class_folders]
            known = set(self.folders)
            unknown = [f for f in present if f not in known]
            if unknown:
                raise DataError(f"{self.root / unknown[0]} is not one of the {len(self.folders)} class folders of "
                                f"this data set (e.g. {self.folders[0]!r}); is {self.root} the right folder?")
        else:
            self.folders = list(present)
        class_to_idx = {f: self.folders.index(f) for f in present}
        # empty class folders are allowed (a small subset may miss classes): the label space stays all folders
        items = make_dataset(str(self.root), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
        items.sort(key=lambda item: (item[1], item[0]))
        if not items:
            raise DataError(f"no images ({', '.join(IMG_EXTENSIONS)}) in the class folders under {self.root}")
        if classnames is not None:
            self.classnames: list[str] = [str(c) for c in classnames]
            if len(self.classnames) != len(self.folders):
                raise DataError(f"{len(self.classnames)} class names for {len(self.folders)} class folders")
        elif classnames_file is not None:
            self.classnames = read_classnames(classnames_file, len(self.folders))
        else:
            self.classnames = [f.replace("_", " ") for f in self.folders]
        self.templates = [str(t) for t in templates] if templates is not None else None
        self._samples: dict[str, tuple[str, int]] = {}
        for path, label in items:
            sid = f"{self.folders[label]}/{Path(path).stem}"
            if sid in self._samples:
                raise DataError(f"two images share the id {sid!r} (same name, different extension) under {self.root}")
            self._samples[sid] = (path, label)
        self.pool = f"all {len(self._samples)} images under {self.root.name}/"
        if split_file is not None:
            self._restrict(Path(split_file))
        self._ids = list(self._samples)
        log.info("%s: %d images in %d of %d classes (%s)", self.root, len(self._ids), len(present),
                 len(self.folders), self.pool)

    def _restrict(self, split_file: Path) -> None:
        """Keep the images ``split_file`` lists (``<class folder>/<file name>`` per line)."""
        p = require_file(split_file, "split file (one <class folder>/<image file> per line)")
        wanted = []
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                rel = Path(line.strip())
                if len(rel.parts) != 2:
                    raise DataError(f"{p} line {n}: expected <class folder>/<image file>, got {line.strip()!r}")
                wanted.append(f"{rel.parts[0]}/{rel.stem}")
        missing = [w for w in wanted if w not in self._samples]
        if missing:
            raise DataError(f"{p} lists {len(missing)} images that are not under {self.root} "
                            f"(e.g. {missing[0]}); the split file and the image folder do not match")
        order = {sid: i for i, sid in enumerate(self._samples)}
        self._samples = {w: self._samples[w] for w in sorted(set(wanted), key=order.__getitem__)}
        self.pool = f"the {len(self._samples)} images listed in {p.name}"

    @property
    def ids(self) -> list[str]:
        return list(self._ids)

    def get(self, sample_id: str) -> dict[str, Any]:
        if sample_id not in self._samples:
            raise KeyError(f"no image {sample_id!r} under {self.root}")
        path, label = self._samples[sample_id]
        return {"id": sample_id, "image_path": path, "label": label}
