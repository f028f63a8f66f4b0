"""Captioning samples: the Karpathy split file for which images, a COCO-style captions file for references.

Why two files: the Karpathy split (``dataset_coco.json``, ``dataset_flickr30k.json``) fixes the test
images every captioning paper uses, while CIDEr is computed, as in RobustVLM / open_flamingo, against the
COCO-style annotation file (``captions_val2014.json``, or a COCO-style Flickr30k file). The shapes world
writes both files in these formats, so it goes through the same code.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from evaluators.datasets.base import DataError, SampleSource, require_dir, require_file

log = logging.getLogger(__name__)

ID_KEYS = ("auto", "cocoid", "imgid", "filename")
#: the Karpathy split OpenFlamingo's evaluation draws its demonstrations from
DEMO_SPLIT = "train"


def load_json(path: Path, what: str) -> Any:
    """Parse a JSON annotation file, turning a syntax error into a DataError that names the file."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        reason = "not valid JSON (truncated or malformed)" if isinstance(e, json.JSONDecodeError) else "not UTF-8 text"
        raise DataError(f"{what} at {path} is {reason} ({e}); re-download or regenerate it") from e


def entries_of(data: Any, key: str, path: Path, expected: str) -> list[dict[str, Any]]:
    """``data[key]`` as a list of objects, else a DataError naming the file and the field."""
    items = data.get(key) if isinstance(data, dict) else None
    if not isinstance(items, list):
        raise DataError(f"{path} has no '{key}' list; expected {expected}")
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise DataError(f"{path}: '{key}'[{i}] is a {type(item).__name__}, not an object; expected {expected}")
    return items


def _image_id(entry: dict[str, Any], key: str) -> str:
    if key == "filename":
        return Path(str(entry["filename"])).stem
    return str(entry[key])


class KarpathyCaptions(SampleSource):
    """The images of one Karpathy split with their reference captions.

    Ids are in the order of the Karpathy file (the order RobustVLM iterates); the evaluated subset is
    drawn from this list. ``id_key`` says which field is the sample id and the key into the references:
    ``"auto"`` uses ``cocoid`` when the entries have it (COCO, shapes), otherwise the filename stem when
    that is what the references file is keyed by (Flickr30k's COCO-style file uses the Flickr photo id,
    as open_flamingo does), else ``imgid``.

    ``get`` returns ``captions`` (the references from ``references_file``, or the Karpathy "raw"
    sentences when it is None) and ``sentences`` (the Karpathy "raw" sentences, in file order: the
    ground-truth captions RobustVLM's attack uses one after the other).
    """

    def __init__(
        self,
        karpathy_file: str | Path,
        references_file: str | Path | None,
        image_root: str | Path,
        split: str = "test",
        id_key: str = "auto",
    ):
        if id_key not in ID_KEYS:
            raise ValueError(f"id_key must be one of {ID_KEYS}, got {id_key!r}")
        kfile = require_file(karpathy_file, "Karpathy split file (e.g. dataset_coco.json)")
        self.image_root = require_dir(image_root, "caption image folder")
        self.split = split
        self.karpathy_file = kfile
        images = entries_of(load_json(kfile, "Karpathy split file"), "images", kfile,
                            "a Karpathy split file like dataset_coco.json")
        entries = [e for e in images if e.get("split") == split]
        if not entries:
            splits = sorted({str(e.get("split")) for e in images})
            raise DataError(f"{kfile} has no images in split {split!r} (field 'split'; splits present: {splits})")
        # OpenFlamingo's demonstrations: the first raw sentence of every Karpathy train image
        self._train = [e for e in images if e.get("split") == DEMO_SPLIT]

        references: dict[str, list[str]] | None = None
        if references_file is not None:
            rfile = require_file(references_file, "COCO-style captions file (e.g. captions_val2014.json)")
            references = self._read_references(rfile)
        self.id_key = self._resolve_id_key(id_key, entries, references)

        self._samples: dict[str, dict[str, Any]] = {}
        for e in entries:
            try:
                sid = _image_id(e, self.id_key)
                sentences = [str(s["raw"]) for s in e.get("sentences", [])]
                rel = Path(str(e.get("filepath", ""))) / str(e["filename"])
                name = str(e["filename"])
            except (KeyError, TypeError) as err:
                raise DataError(f"{kfile}: an image entry lacks the field {err} (or 'sentences'[].'raw'); "
                                "not a Karpathy split file") from err
            if sid in self._samples:
                raise DataError(f"{kfile}: sample id {sid!r} appears twice in split {split!r}")
            self._samples[sid] = {"rel": rel, "name": name, "sentences": sentences}

        if references is None:
            for sid, s in self._samples.items():
                if not s["sentences"]:
                    raise DataError(f"{kfile}: image {sid} has no sentences; pass a references_file")
                s["captions"] = list(s["sentences"])
        else:
            missing = [sid for sid in self._samples if sid not in references]
            if missing:
                raise DataError(
                    f"{references_file} has no captions for {len(missing)} of the {len(self._samples)} "
                    f"{split!r} images (e.g. id {missing[0]}); use the captions file that matches the split file"
                )
            for sid, s in self._samples.items():
                s["captions"] = references[sid]
        self._ids = list(self._samples)
        log.info("%s: %d %s images (id key %s)", kfile.name, len(self._ids), split, self.id_key)

    @staticmethod
    def _read_references(rfile: Path) -> dict[str, list[str]]:
        annotations = entries_of(load_json(rfile, "COCO-style captions file"), "annotations", rfile,
                                 "a COCO captions file like captions_val2014.json")
        refs: dict[str, list[str]] = {}
        for ann in annotations:
            try:
                refs.setdefault(str(ann["image_id"]), []).append(str(ann["caption"]))
            except KeyError as err:
                raise DataError(f"{rfile}: an annotation lacks {err}; expected image_id and caption") from err
        return refs

    @staticmethod
    def _resolve_id_key(id_key: str, entries: list[dict[str, Any]], refs: dict[str, list[str]] | None) -> str:
        if id_key != "auto":
            return id_key
        if all("cocoid" in e for e in entries):
            return "cocoid"
        if refs is not None:
            def coverage(key: str) -> int:
                n = 0
                for e in entries:
                    try:
                        n += _image_id(e, key) in refs
                    except KeyError:
                        pass
                return n

            if coverage("filename") > coverage("imgid"):
                return "filename"
        return "imgid"

    @property
    def ids(self) -> list[str]:
        return list(self._ids)

    def image_path(self, sample_id: str) -> Path:
        """``image_root/filepath/filename`` if it exists (COCO root with val2014/), else ``image_root/filename``."""
        s = self._samples[sample_id]
        nested = self.image_root / s["rel"]
        return nested if nested.is_file() else self.image_root / s["name"]

    def get(self, sample_id: str) -> dict[str, Any]:
        if sample_id not in self._samples:
            raise KeyError(f"no sample {sample_id!r} in the {self.split!r} split")
        s = self._samples[sample_id]
        return {
            "id": sample_id,
            "image_path": str(self.image_path(sample_id)),
            "captions": list(s["captions"]),
            "sentences": list(s["sentences"]),
        }

    def demonstrations(self) -> list[dict[str, Any]]:
        """``{"caption": first raw sentence}`` of every Karpathy train image, in file order (open_flamingo's
        caption demonstrations come from the same file's ``train`` entries, sentence 0)."""
        if not self._train:
            raise DataError(f"{self.karpathy_file} has no images in split {DEMO_SPLIT!r} (field 'split'), which "
                            "OpenFlamingo's demonstrations need; use the complete Karpathy split file")
        pool = []
        for e in self._train:
            try:
                pool.append({"caption": str(e["sentences"][0]["raw"])})
            except (KeyError, IndexError, TypeError) as err:
                raise DataError(f"{self.karpathy_file}: train image {e.get('imgid')} lacks 'sentences'[0].'raw' "
                                f"({err!r})") from err
        return pool
