"""The shapes world generator: deterministic, consistent across its file formats, idempotent."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evaluators.datasets.shapes import CLASSNAMES, COLORS, generate_shapes, is_generated

os.environ.setdefault("HF_HUB_OFFLINE", "1")

N_TRAIN, N_TEST, SIZE = 30, 10, 64


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_shapes(
        tmp_path_factory.mktemp("shapes"), n_train=N_TRAIN, n_test=N_TEST, size=SIZE, seed=3
    )


def _load(p: Path) -> dict:
    return json.loads(p.read_text())


def test_deterministic_from_seed(world: Path, tmp_path: Path) -> None:
    again = generate_shapes(tmp_path / "a", n_train=N_TRAIN, n_test=N_TEST, size=SIZE, seed=3)
    other = generate_shapes(tmp_path / "b", n_train=N_TRAIN, n_test=N_TEST, size=SIZE, seed=4)
    for name in (
        "dataset_shapes.json",
        "captions_shapes.json",
        "vqa/annotations_test.json",
        "scenes_shapes.json",
    ):
        assert (world / name).read_bytes() == (again / name).read_bytes(), name
    for i in (0, 7, N_TRAIN + N_TEST - 1):
        f = f"images/shapes_{i:05d}.png"
        assert (world / f).read_bytes() == (again / f).read_bytes()
    assert (world / "dataset_shapes.json").read_bytes() != (other / "dataset_shapes.json").read_bytes()
    assert (world / "images/shapes_00000.png").read_bytes() != (
        other / "images/shapes_00000.png"
    ).read_bytes()


def test_karpathy_and_coco_captions_agree(world: Path) -> None:
    k = _load(world / "dataset_shapes.json")
    coco = _load(world / "captions_shapes.json")
    assert k["dataset"] == "shapes"
    imgs = k["images"]
    assert [e["imgid"] for e in imgs] == list(range(N_TRAIN + N_TEST))
    assert Counter(e["split"] for e in imgs) == {"train": N_TRAIN, "test": N_TEST}
    refs: dict[int, list[str]] = {}
    for a in coco["annotations"]:
        refs.setdefault(a["image_id"], []).append(a["caption"])
    assert {im["id"]: im["file_name"] for im in coco["images"]} == {e["imgid"]: e["filename"] for e in imgs}
    for e in imgs:
        assert e["filename"] == f"shapes_{e['imgid']:05d}.png" and e["cocoid"] == e["imgid"]
        assert (world / e["filepath"] / e["filename"]).is_file()
        sents = e["sentences"]
        assert len(sents) == 5 and len(set(s["raw"] for s in sents)) == 5
        assert e["sentids"] == [s["sentid"] for s in sents]
        for s in sents:
            assert s["imgid"] == e["imgid"]
            assert s["tokens"] == s["raw"].split()
            assert all(t.isalpha() and t.islower() for t in s["tokens"])
        assert refs[e["imgid"]] == [s["raw"] for s in sents]
    assert len({a["id"] for a in coco["annotations"]}) == 5 * (N_TRAIN + N_TEST)


def _norm(a: str) -> str:
    words = "".join(c if c.isalnum() or c.isspace() else " " for c in a.lower()).split()
    nums = {"one": "1", "two": "2", "three": "3"}
    return " ".join(nums.get(w, w) for w in words if w not in ("a", "the", "color"))


def test_vqa_files(world: Path) -> None:
    scenes = {s["imgid"]: s for s in _load(world / "scenes_shapes.json")["scenes"]}
    for split, lo, hi in (("train", 0, N_TRAIN), ("test", N_TRAIN, N_TRAIN + N_TEST)):
        qs = _load(world / "vqa" / f"questions_{split}.json")["questions"]
        anns = _load(world / "vqa" / f"annotations_{split}.json")["annotations"]
        assert [q["question_id"] for q in qs] == [a["question_id"] for a in anns]
        per_image = Counter(q["image_id"] for q in qs)
        assert set(per_image) == set(range(lo, hi))
        assert all(2 <= c <= 4 for c in per_image.values())
        for q, a in zip(qs, anns, strict=True):
            assert q["image_id"] == a["image_id"] and q["question"].endswith("?")
            assert a["answer_type"] in ("yes/no", "number", "other")
            answers = a["answers"]
            assert [x["answer_id"] for x in answers] == list(range(1, 11))
            assert all(x["answer_confidence"] == "yes" for x in answers)
            truth = a["multiple_choice_answer"]
            # the majority (after normalisation) is the truth
            assert Counter(_norm(x["answer"]) for x in answers).most_common(1)[0][0] == _norm(truth)
            sc = scenes[a["image_id"]]
            if a["question_type"] == "how many":
                assert truth == str(len(sc["shapes"]))
            if a["question_type"] == "what color is the":
                shape = q["question"].split()[-1].rstrip("?")
                assert truth == next(s["color"] for s in sc["shapes"] if s["shape"] == shape)
    # annotator variation is present somewhere (so normalisation matters)
    all_answers = [
        x["answer"] for a in _load(world / "vqa/annotations_train.json")["annotations"] for x in a["answers"]
    ]
    assert any(x != x.lower().strip(".!") or x in ("two", "three") for x in all_answers)


def test_class_folders_match_labels(world: Path) -> None:
    names = (world / "classes" / "classnames.txt").read_text().split()
    assert names == list(CLASSNAMES) == sorted(names)
    scenes = _load(world / "scenes_shapes.json")["scenes"]
    for split in ("train", "test"):
        assert sorted(p.name for p in (world / "classes" / split).iterdir()) == names
    for s in scenes:
        radii = [sh["radius"] for sh in s["shapes"]]
        assert radii[0] == max(radii) and all(r < radii[0] * 0.7 for r in radii[1:])
        assert names[s["label"]] == s["shapes"][0]["shape"]
        f = f"shapes_{s['imgid']:05d}.png"
        found = [p for p in (world / "classes" / s["split"]).glob(f"*/{f}")]
        assert [p.parent.name for p in found] == [names[s["label"]]]
        assert found[0].read_bytes() == (world / "images" / f).read_bytes()


def test_images_show_the_annotated_main_shape(world: Path) -> None:
    offsets = {"left": (-1, 0), "right": (1, 0), "top": (0, -1), "bottom": (0, 1), "center": (0, 0)}
    for s in _load(world / "scenes_shapes.json")["scenes"]:
        img = np.asarray(Image.open(world / "images" / f"shapes_{s['imgid']:05d}.png"))
        assert img.shape == (SIZE, SIZE, 3) and img.dtype == np.uint8
        m = s["shapes"][0]
        ox, oy = offsets[m["position"]]
        cx = int(round(SIZE / 2 + ox * 0.31 * SIZE + m["dx"]))
        cy = int(round(SIZE / 2 + oy * 0.31 * SIZE + m["dy"]))
        assert np.abs(img[cy, cx].astype(int) - np.array(COLORS[m["color"]])).max() <= 3


def test_idempotent_marker(tmp_path: Path) -> None:
    root = generate_shapes(tmp_path / "w", n_train=4, n_test=2, seed=1)
    assert is_generated(root, n_train=4, n_test=2, seed=1)
    assert not is_generated(root, n_train=5, n_test=2, seed=1)
    png = root / "images" / "shapes_00000.png"
    png.write_bytes(b"sentinel")  # untouched when the marker matches
    generate_shapes(root, n_train=4, n_test=2, seed=1)
    assert png.read_bytes() == b"sentinel"
    (root / "DONE").unlink()  # an interrupted run (no marker) is redone
    generate_shapes(root, n_train=4, n_test=2, seed=1)
    assert png.read_bytes().startswith(b"\x89PNG")
    generate_shapes(root, n_train=3, n_test=1, seed=1)  # other parameters replace the old world
    assert len(list((root / "images").glob("shapes_*.png"))) == 4
    assert len(list((root / "classes").glob("*/*/*.png"))) == 4
    assert len(_load(root / "dataset_shapes.json")["images"]) == 4


def test_rejects_bad_parameters(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        generate_shapes(tmp_path / "x", n_train=0, n_test=0)
    with pytest.raises(ValueError):
        generate_shapes(tmp_path / "y", n_train=2, n_test=1, size=8)
