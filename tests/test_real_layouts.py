"""The six real data sets as distributed, through the real entry points.

The tiny copies (tests/real_layouts.py) follow the official files field for field and hold no class-name
file. ``python run.py`` runs on each with the embedded models, ``scripts/prepare_data.py`` converts ImageNet's
flat val folder and writes the manifests the runs then use, and lists what a partly filled root misses.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from evaluators.datasets import labels
from evaluators.datasets.base import DataError
from evaluators.datasets.imagefolder import ImageFolderClasses
from evaluators.datasets.imagenet_val import convert_flat_val
from tests.real_layouts import (
    BUILDERS,
    IMAGENET_CLASSES,
    _dump,
    _img,
    build_caltech101,
    build_imagenet_flat,
    build_textvqa,
    build_vqav2,
)

ROOT = Path(__file__).resolve().parents[1]
#: the embedded models used per task kind (the only place the test names a vlm config)
VLM_FOR = {"generative": "tiny_llava", "zero_shot": "tiny_clip"}
CAPTION_VQA_SETS = ("coco", "flickr30k", "vqav2", "textvqa")
CLASSIFICATION_SETS = ("caltech101", "imagenet")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("real")
    for name, build in BUILDERS.items():
        build(root / name)
    return root


def prepare_data(args: list[str]) -> tuple[int, str]:
    """``scripts/prepare_data.py`` in this process (its exit status and stdout): no second interpreter start."""
    spec = importlib.util.spec_from_file_location("prepare_data", ROOT / "scripts" / "prepare_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = module.main(args)
    return code, out.getvalue()


def run_script(args: list[str], cwd: Path = ROOT, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def prepared(data_root) -> tuple[int, str]:
    """``scripts/prepare_data.py`` once on the complete copies: manifests of 4 samples, ImageNet's val/."""
    return prepare_data([str(data_root), "n_samples=4"])


def test_prepare_data_converts_and_writes_manifests(data_root, prepared):
    code, stdout = prepared
    assert code == 0, stdout
    for name in BUILDERS:
        assert f"{name}: ok" in stdout
    # ImageNet: the flat folder became val/<wnid>/ with the CSV's labels (rows were in reverse order)
    val = data_root / "imagenet" / "val"
    assert sorted(p.name for p in val.iterdir()) == sorted(w for w, _, _ in IMAGENET_CLASSES)
    assert (val / "n02119789" / "ILSVRC2012_val_00000001.JPEG").is_file()
    assert (val / "n01440764" / "ILSVRC2012_val_00000003.JPEG").is_file()
    m = json.loads((data_root / "coco" / "manifests" / "captioning_n4_seed42.json").read_text())
    assert m["n"] == 4 and m["of"] == 5 and m["seed"] == 42 and len(set(m["ids"])) == 4
    assert set(m["ids"]) <= {"391895", "522418", "184613", "318219", "554625"}
    cal = json.loads((data_root / "caltech101" / "manifests" / "classification_n4_seed42.json").read_text())
    assert cal["pool"].startswith("all 8 images")
    assert "2 train demonstrations" in stdout  # vqav2: 1 train image x 2 questions


def run_datasets(data_root: Path, out: Path, names: tuple[str, ...], vlm: str) -> dict[str, dict]:
    proc = run_script(["run.py", "-m", f"dataset={','.join(names)}", f"vlm={vlm}", "n_samples=4",
                       "batch_size=4", "defense=none", "attack=none", f"paths.data_dir={data_root}",
                       f"paths.cache_dir={out / 'cache'}", f"hydra.sweep.dir={out}",
                       "hydra.sweep.subdir=${dataset.name}"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    print(proc.stdout[-3000:])
    return {n: json.loads((out / n / "summary.json").read_text()) for n in names}


def test_run_py_on_every_layout(data_root, prepared, tmp_path):
    assert prepared[0] == 0, prepared[1]
    gen = run_datasets(data_root, tmp_path / "gen", CAPTION_VQA_SETS, VLM_FOR["generative"])
    for name in ("coco", "flickr30k"):
        assert gen[name]["metrics"]["captioning"]["cider"]["clean"] >= 0
    for name in ("vqav2", "textvqa"):
        assert 0 <= gen[name]["metrics"]["vqa"]["vqa_acc"]["clean"] <= 100
    zs = run_datasets(data_root, tmp_path / "zs", CLASSIFICATION_SETS, VLM_FOR["zero_shot"])
    for name in CLASSIFICATION_SETS:
        assert 0 <= zs[name]["metrics"]["classification"]["top1"]["clean"] <= 100
    # every run evaluated exactly the prepared subset
    for name, sub in [("coco", "gen"), ("textvqa", "gen"), ("imagenet", "zs")]:
        task = {"coco": "captioning", "textvqa": "vqa", "imagenet": "classification"}[name]
        run_manifest = json.loads((tmp_path / sub / name / f"manifest_{task}.json").read_text())
        prepared = json.loads((data_root / name / "manifests" / f"{task}_n4_seed42.json").read_text())
        assert run_manifest["ids"] == prepared["ids"] and run_manifest["prepared"]


def test_prepare_data_lists_exactly_what_is_missing(tmp_path):
    root = tmp_path / "partial"
    build_vqav2(root / "vqav2", train=False)  # val complete, train (demonstrations) absent
    build_caltech101(root / "caltech101")
    (root / "coco" / "val2014").mkdir(parents=True)  # an empty image folder counts as missing
    _dump(root / "coco" / "dataset_coco.json", {"images": [], "dataset": "coco"})
    build_textvqa(root / "textvqa")
    val = root / "textvqa" / "TextVQA_0.5.1_val.json"
    val.write_text(val.read_text()[:200])  # truncated download
    code, stdout = prepare_data([str(root), "--datasets", "coco", "vqav2", "caltech101", "imagenet", "textvqa",
                                 "n_samples=4"])
    assert code == 1, stdout
    missing = sorted(line.strip() for line in stdout.splitlines() if line.strip().startswith("- missing"))
    assert [m.split(" (")[0] for m in missing] == [
        "- missing annotations/captions_val2014.json", "- missing v2_OpenEnded_mscoco_train2014_questions.json",
        "- missing v2_mscoco_train2014_annotations.json", "- missing val/", "- missing val2014/"]
    assert all("http" in m for m in missing)
    assert "caltech101: ok" in stdout and "vqav2: INCOMPLETE" in stdout
    errors = [line for line in stdout.splitlines() if line.startswith("textvqa:")]
    assert len(errors) == 1 and "ERROR" in errors[0] and "TextVQA_0.5.1_val.json is not valid JSON" in errors[0]
    # what is complete still gets its manifest
    assert (root / "vqav2" / "manifests" / "vqa_n4_seed42.json").is_file()


# ------------------------------------------------------------------ class lists and the ImageNet conversion


def test_shipped_class_lists_are_complete_and_aligned():
    wnids = labels.class_folders("imagenet1k")
    assert len(wnids) == 1000 and wnids == sorted(wnids) and len(set(wnids)) == 1000
    names = labels.classnames("imagenet1k")
    assert len(names) == 1000 and names[0] == "tench" and names[wnids.index("n02119789")] == "kit fox"
    temps = labels.templates("imagenet1k")
    assert len(temps) == 80 and len(set(temps)) == 80 and all(t.count("{}") == 1 for t in temps)
    assert temps[0].format("dog") == "a bad photo of a dog."
    folders = labels.class_folders("caltech101")
    assert len(folders) == 102 and folders == sorted(folders) and folders[0] == "BACKGROUND_Google"
    cal = labels.classnames("caltech101")
    assert len(cal) == 102 and cal[0] == "background" and cal[folders.index("Faces_easy")] == "centered face"
    assert cal[folders.index("yin_yang")] == "yin and yang symbol"
    assert len(labels.templates("caltech101")) == 34
    # the JSON files are kept as published: {c} placeholders, MIT licence beside them
    raw = json.loads(labels.TEMPLATES_FILE.read_text())
    assert raw["caltech101"][0] == "a photo of a {c}."
    assert "MIT License" in (labels.DATA_DIR / "LICENSE_CLIP_benchmark.txt").read_text()


def test_imagenet_labels_follow_the_sorted_wnids_of_a_partial_copy(tmp_path):
    root = tmp_path / "val"
    for wnid in ("n15075141", "n02119789"):
        _img(root / wnid / f"ILSVRC2012_val_{len(wnid):08d}.JPEG", 0)
    src = ImageFolderClasses(root, class_folders=labels.class_folders("imagenet1k"),
                             classnames=labels.classnames("imagenet1k"), templates=labels.templates("imagenet1k"))
    assert [src.get(i)["label"] for i in src.ids] == [278, 999]
    assert len(src.classnames) == 1000 and src.classnames[999] == "toilet paper" and len(src.templates) == 80
    _img(root / "n99999999" / "x.JPEG", 1)
    with pytest.raises(DataError, match="n99999999 is not one of the 1000 class folders"):
        ImageFolderClasses(root, class_folders=labels.class_folders("imagenet1k"))


def test_caltech101_keeps_the_background_class_and_split_file(tmp_path):
    from evaluators.datasets import labels
    build_caltech101(tmp_path)
    root = tmp_path / "101_ObjectCategories"
    kw = dict(class_folders=labels.class_folders("caltech101"), classnames=labels.classnames("caltech101"))
    src = ImageFolderClasses(root, **kw)
    assert src.get("BACKGROUND_Google/image_0001")["label"] == 0
    assert src.get("yin_yang/image_0002")["label"] == 101
    assert src.classnames[src.get("Faces_easy/image_0001")["label"]] == "centered face"
    assert src.pool.startswith("all 8 images")
    split = tmp_path / "test_split.txt"
    split.write_text("yin_yang/image_0002.jpg\naccordion/image_0001.jpg\n")
    sub = ImageFolderClasses(root, **kw, split_file=split)
    assert sub.ids == ["accordion/image_0001", "yin_yang/image_0002"] and "test_split.txt" in sub.pool
    split.write_text("accordion/image_0009.jpg\n")
    with pytest.raises(DataError, match="test_split.txt lists 1 images that are not under"):
        ImageFolderClasses(root, **kw, split_file=split)


@pytest.mark.parametrize("ground_truth", ["csv", "devkit"])
def test_imagenet_flat_val_conversion(tmp_path, ground_truth):
    expected = build_imagenet_flat(tmp_path, ground_truth)
    flat = [d for d in ("ILSVRC2012_img_val", "ILSVRC/Data/CLS-LOC/val") if (tmp_path / d).is_dir()]
    assert convert_flat_val(tmp_path, flat_dirs=flat)["status"] == "converted"
    got = {p.stem: p.parent.name for p in (tmp_path / "val").glob("*/*.JPEG")}
    assert got == expected
    assert not (tmp_path / "val.partial").exists()
    assert convert_flat_val(tmp_path, flat_dirs=flat)["status"] == "present"  # never redone or overwritten


def test_imagenet_conversion_errors_name_the_file(tmp_path):
    build_imagenet_flat(tmp_path, "csv")
    csv_file = tmp_path / "LOC_val_solution.csv"
    lines = csv_file.read_text().splitlines()
    csv_file.write_text("\n".join(lines[:-1]) + "\n")  # truncated: one image has no row
    with pytest.raises(DataError, match=r"LOC_val_solution.csv has no label for ILSVRC2012_val_0000000\d.JPEG"):
        convert_flat_val(tmp_path)
    csv_file.write_text("\n".join([lines[0], *(line.replace("n01440764", "n00000001") for line in lines[1:])]))
    with pytest.raises(DataError, match="'n00000001'.*not one of the 1000"):
        convert_flat_val(tmp_path)
    csv_file.write_text("ImageId,Labels\n")
    with pytest.raises(DataError, match="PredictionString"):
        convert_flat_val(tmp_path)
    assert not (tmp_path / "val").exists()
    csv_file.unlink()
    assert convert_flat_val(tmp_path)["status"] == "missing"
