"""Tiny copies of the six real data sets as distributed: official file names, folder layouts and JSON schemas
field for field (Karpathy split files, COCO captions, VQAv2 questions/annotations, TextVQA 0.5.1, Caltech101's
101_ObjectCategories, ImageNet's flat val folder with Kaggle's LOC_val_solution.csv or the ILSVRC2012 devkit),
a few generated images each, and no class-name file. Shared by test_real_layouts.py and test_datasets.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

# ImageNet: (wnid, index in the sorted list, CLIP_benchmark name)
IMAGENET_CLASSES = [("n01440764", 0, "tench"), ("n02119789", 278, "kit fox"), ("n15075141", 999, "toilet paper")]


def _img(path: Path, seed: int, size: tuple[int, int] = (40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG")


def _dump(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def _sentences(imgid: int, first_sentid: int, raws: list[str]) -> list[dict]:
    return [{"tokens": r.lower().rstrip(".").split(), "raw": r, "imgid": imgid, "sentid": first_sentid + j}
            for j, r in enumerate(raws)]


def _coco_captions_file(ids_files: list[tuple[int, str]], captions: dict[int, list[str]]) -> dict:
    """``captions_val2014.json`` as distributed: info, images, licenses, annotations."""
    return {
        "info": {"description": "COCO 2014 Dataset", "url": "http://cocodataset.org", "version": "1.0",
                 "year": 2014, "contributor": "COCO Consortium", "date_created": "2017/09/01"},
        "images": [{"license": 3, "file_name": f, "coco_url": f"http://images.cocodataset.org/val2014/{f}",
                    "height": 30, "width": 40, "date_captured": "2013-11-14 11:18:45",
                    "flickr_url": "http://farm4.staticflickr.com/x.jpg", "id": i} for i, f in ids_files],
        "licenses": [{"url": "http://creativecommons.org/licenses/by-nc-sa/2.0/", "id": 1,
                      "name": "Attribution-NonCommercial-ShareAlike License"}],
        "annotations": [{"image_id": i, "id": 1000 * i + j, "caption": c}
                        for i, caps in captions.items() for j, c in enumerate(caps)],
    }


def build_coco(root: Path) -> None:
    test_ids = [391895, 522418, 184613, 318219, 554625]
    images, files, refs = [], [], {}
    for k, cid in enumerate(test_ids):
        name = f"COCO_val2014_{cid:012d}.jpg"
        _img(root / "val2014" / name, cid)
        raws = [f"a red shape number {k}.", f"a picture of shape {k}.", "a shape on a background.",
                "some colours.", "an image."]
        images.append({"filepath": "val2014", "sentids": list(range(5 * k, 5 * k + 5)), "filename": name,
                       "imgid": k, "split": "test", "sentences": _sentences(k, 5 * k, raws), "cocoid": cid})
        files.append((cid, name))
        refs[cid] = raws
    for k, (cid, split, folder) in enumerate([(9, "train", "train2014"), (25, "restval", "val2014")], 5):
        name = f"COCO_{folder}_{cid:012d}.jpg"
        images.append({"filepath": folder, "sentids": [100 + k], "filename": name, "imgid": k, "split": split,
                       "sentences": _sentences(k, 100 + k, [f"a {split} caption."]), "cocoid": cid})
    _dump(root / "dataset_coco.json", {"images": images, "dataset": "coco"})
    _dump(root / "annotations" / "captions_val2014.json", _coco_captions_file(files, refs))


def build_flickr30k(root: Path) -> None:
    photos = [1000092795, 10002456, 1000268201, 1000344755, 1000366164]
    images, files, refs = [], [], {}
    for k, pid in enumerate(photos):
        _img(root / "flickr30k-images" / f"{pid}.jpg", pid)
        raws = [f"Two shapes {k} on a wall .", "A picture .", "Colours everywhere .", "An image .", "Shapes ."]
        images.append({"sentids": list(range(5 * k, 5 * k + 5)), "imgid": k, "sentences": _sentences(k, 5 * k, raws),
                       "split": "test", "filename": f"{pid}.jpg"})
        files.append((pid, f"{pid}.jpg"))
        refs[pid] = raws
    images.append({"sentids": [99], "imgid": 5, "sentences": _sentences(5, 99, ["A train sentence ."]),
                   "split": "train", "filename": "1001465944.jpg"})
    _dump(root / "dataset_flickr30k.json", {"images": images, "dataset": "flickr30k"})
    _dump(root / "dataset_flickr30k_coco_style.json", _coco_captions_file(files, refs))


def _vqa_pair(split: str, image_ids: list[int]) -> tuple[dict, dict]:
    """VQAv2's questions and annotations files of ``split`` (e.g. ``val2014``)."""
    info = {"description": "This is v2.0 of the VQA dataset.", "url": "http://visualqa.org", "version": "2.0",
            "year": 2017, "contributor": "VQA Team", "date_created": "2017-04-26 17:07:13"}
    lic = {"url": "http://creativecommons.org/licenses/by/4.0/", "name": "Creative Commons Attribution 4.0"}
    questions, annotations = [], []
    for iid in image_ids:
        for j, (q, answers, qtype, atype) in enumerate([
            ("What color is the shape?", ["red"] * 7 + ["Red", "orange", "red "], "what color is the", "other"),
            ("Is there a shape?", ["no"] + ["yes"] * 9, "is there a", "yes/no"),  # first != most common
        ]):
            qid = iid * 1000 + j
            questions.append({"image_id": iid, "question": q, "question_id": qid})
            annotations.append({
                "question_type": qtype, "multiple_choice_answer": max(set(answers), key=answers.count),
                "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": n + 1}
                            for n, a in enumerate(answers)],
                "image_id": iid, "answer_type": atype, "question_id": qid})
    qfile = {"info": info, "task_type": "Open-Ended", "data_type": "mscoco", "license": lic,
             "data_subtype": split, "questions": questions}
    afile = {"info": info, "license": lic, "data_subtype": split, "annotations": annotations,
             "data_type": "mscoco"}
    return qfile, afile


def build_vqav2(root: Path, train: bool = True) -> None:
    ids = [262148, 393225, 524291]
    for iid in ids:
        _img(root / "val2014" / f"COCO_val2014_{iid:012d}.jpg", iid)
    q, a = _vqa_pair("val2014", ids)
    _dump(root / "v2_OpenEnded_mscoco_val2014_questions.json", q)
    _dump(root / "v2_mscoco_val2014_annotations.json", a)
    if train:
        q, a = _vqa_pair("train2014", [458752])
        _dump(root / "v2_OpenEnded_mscoco_train2014_questions.json", q)
        _dump(root / "v2_mscoco_train2014_annotations.json", a)


def _textvqa(set_name: str, image_ids: list[str], first_qid: int) -> dict:
    data = []
    for k, iid in enumerate(image_ids):
        data.append({
            "question": "what is written on the sign?", "image_id": iid, "image_classes": ["Street sign"],
            "flickr_original_url": f"https://farm2.staticflickr.com/{iid}_o.jpg",
            "flickr_300k_url": f"https://c4.staticflickr.com/{iid}_z.jpg", "image_width": 40, "image_height": 30,
            "answers": ["stop"] * 6 + ["stop sign", "STOP", "stop", "halt"],
            "question_tokens": ["what", "is", "written", "on", "the", "sign"],
            "question_id": first_qid + k, "set_name": set_name})
    return {"dataset_type": set_name, "dataset_name": "textvqa", "dataset_version": "0.5.1", "data": data}


def build_textvqa(root: Path) -> None:
    ids = ["003a8ae2ef43b901", "0054c91397f2fe05", "005635e119b9f32f", "00685bc495504d61"]
    for k, iid in enumerate(ids):
        _img(root / "train_images" / f"{iid}.jpg", k)
    _dump(root / "TextVQA_0.5.1_val.json", _textvqa("val", ids, 34602))
    _dump(root / "TextVQA_0.5.1_train.json", _textvqa("train", ["0000599864fd15b3"], 0))


def build_caltech101(root: Path) -> None:
    for k, folder in enumerate(["BACKGROUND_Google", "Faces_easy", "accordion", "yin_yang"]):
        for n in (1, 2):
            _img(root / "101_ObjectCategories" / folder / f"image_{n:04d}.jpg", 10 * k + n)


def build_imagenet_flat(root: Path, ground_truth: str = "csv") -> dict[str, str]:
    """The flat val folder with Kaggle's LOC_val_solution.csv (``csv``) or the ILSVRC2012 devkit (``devkit``)."""
    flat = root / ("ILSVRC/Data/CLS-LOC/val" if ground_truth == "csv" else "ILSVRC2012_img_val")
    labels = {}
    for n in range(1, 7):
        stem = f"ILSVRC2012_val_{n:08d}"
        _img(flat / f"{stem}.JPEG", n)
        labels[stem] = IMAGENET_CLASSES[n % 3][0]
    if ground_truth == "csv":
        rows = [f"{stem},{wnid} 10 12 30 28 {wnid} 1 2 5 6 " for stem, wnid in labels.items()]
        (root / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "\n".join(rows[::-1]) + "\n")
    else:
        write_devkit(root / "ILSVRC2012_devkit_t12", labels)
    return labels


def write_devkit(devkit: Path, labels: dict[str, str]) -> None:
    """``data/meta.mat`` (synsets: ILSVRC2012_ID, WNID, words, gloss, num_children, ...; ids NOT in sorted-wnid
    order, plus a non-leaf synset) and ``data/ILSVRC2012_validation_ground_truth.txt``."""
    import scipy.io

    synsets = [(1, "n02119789", "kit fox, Vulpes macrotis", 0), (2, "n15075141", "toilet tissue", 0),
               (3, "n01440764", "tench, Tinca tinca", 0), (1001, "n00001740", "entity", 5)]
    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
              "num_train_images"]
    arr = np.zeros((len(synsets), 1), dtype=[(f, object) for f in fields])
    for i, (sid, wnid, words, children) in enumerate(synsets):
        arr[i, 0] = (np.array([[sid]]), np.array([wnid]), np.array([words]), np.array(["gloss"]),
                     np.array([[children]]), np.zeros((1, 0)), np.array([[0]]), np.array([[1300]]))
    (devkit / "data").mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(str(devkit / "data" / "meta.mat"), {"synsets": arr})
    id_of = {wnid: sid for sid, wnid, _, _ in synsets}
    lines = [str(id_of[labels[stem]]) for stem in sorted(labels)]
    (devkit / "data" / "ILSVRC2012_validation_ground_truth.txt").write_text("\n".join(lines) + "\n")


BUILDERS = {"coco": build_coco, "flickr30k": build_flickr30k, "vqav2": build_vqav2, "textvqa": build_textvqa,
            "caltech101": build_caltech101, "imagenet": build_imagenet_flat}
