"""The shipped class lists: which folder is class i, its readable name, and the zero-shot prompt templates.

Why shipped: users have the images of ImageNet and Caltech101, never a hand-written class-name file, and
zero-shot numbers are only comparable with the standard names and templates. The files in ``data/``
are unchanged copies of their sources (see ``data/SOURCES.md``): CLIP_benchmark's English class names
and templates (MIT), the sorted ImageNet-1k WordNet ids and the Caltech101 folder names. These
functions are called from the dataset configs (``_target_`` nodes), so a config names a list by key.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"
CLASSNAMES_FILE = DATA_DIR / "clip_benchmark_en_classnames.json"
TEMPLATES_FILE = DATA_DIR / "clip_benchmark_en_zeroshot_classification_templates.json"
#: class-folder keys per data set: line i of the file is the folder of class i
FOLDER_FILES = {"imagenet1k": DATA_DIR / "imagenet1k_wnids.txt", "caltech101": DATA_DIR / "caltech101_folders.txt"}


@cache
def _json(path: Path) -> dict[str, list[str]]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _lookup(table: dict[str, list[str]], name: str, path: Path) -> list[str]:
    if name not in table:
        raise KeyError(f"{path.name} has no entry {name!r}; it has {sorted(table)}")
    return list(table[name])


def classnames(name: str) -> list[str]:
    """CLIP_benchmark's readable class names of data set ``name`` (e.g. ``imagenet1k``), in class order."""
    return _lookup(_json(CLASSNAMES_FILE), name, CLASSNAMES_FILE)


def templates(name: str) -> list[str]:
    """CLIP_benchmark's zero-shot templates of ``name``, with their ``{c}`` placeholder turned into ``{}``.

    The file is kept as published (``"a photo of a {c}."``); the harness formats templates positionally
    (``template.format(classname)``), so the one named field is renamed here and nowhere else.
    """
    return [t.replace("{c}", "{}") for t in _lookup(_json(TEMPLATES_FILE), name, TEMPLATES_FILE)]


def class_folders(name: str) -> list[str]:
    """The folder name of every class of ``name`` in class order (ImageNet: sorted wnids)."""
    if name not in FOLDER_FILES:
        raise KeyError(f"no shipped class-folder list {name!r}; there are {sorted(FOLDER_FILES)}")
    lines = FOLDER_FILES[name].read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip()]
