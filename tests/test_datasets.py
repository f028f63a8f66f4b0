"""Loaders on hand-made files in the real data sets' formats, and on the shapes generator's output."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from evaluators.datasets.base import DataError  # noqa: E402
from evaluators.datasets.captions import KarpathyCaptions  # noqa: E402
from evaluators.datasets.imagefolder import ImageFolderClasses  # noqa: E402
from evaluators.datasets.vqa import VQAQuestions, format_image_name  # noqa: E402


def _img(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (10, 20, 30)).save(path)
    return path


def _dump(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def _karpathy_entry(imgid: int, filepath: str, filename: str, split: str, raws: list[str], cocoid=None):
    e = {"filepath": filepath, "filename": filename, "imgid": imgid, "split": split,
         "sentences": [{"raw": r, "tokens": r.lower().split(), "imgid": imgid} for r in raws]}
    if cocoid is not None:
        e["cocoid"] = cocoid
    return e


@pytest.fixture
def coco(tmp_path):
    """A COCO-like layout: root/val2014/COCO_val2014_<id>.jpg, a Karpathy file and captions_val2014.json."""
    root = tmp_path / "coco"
    ids = [391895, 522418, 184613, 318219]
    splits = ["test", "train", "test", "test"]
    images, anns = [], []
    for i, (cid, split) in enumerate(zip(ids, splits, strict=True)):
        name = f"COCO_val2014_{cid:012d}.jpg"
        _img(root / "val2014" / name)
        images.append(_karpathy_entry(i, "val2014", name, split, [f"karpathy {cid} {j}" for j in range(5)], cid))
        n_caps = 6 if cid == 184613 else 5  # some COCO images have more than five references
        anns += [{"image_id": cid, "id": 10 * cid + j, "caption": f"ref {cid} {j}"} for j in range(n_caps)]
    kfile = _dump(root / "dataset_coco.json", {"dataset": "coco", "images": images})
    rfile = _dump(root / "annotations" / "captions_val2014.json", {"images": [], "annotations": anns[::-1]})
    return root, kfile, rfile


def test_karpathy_coco(coco):
    root, kfile, rfile = coco
    src = KarpathyCaptions(kfile, rfile, root, split="test")
    assert src.ids == ["391895", "184613", "318219"]  # Karpathy file order, test split only
    s = src.get("184613")
    assert s["id"] == "184613"
    assert Path(s["image_path"]) == root / "val2014" / "COCO_val2014_000000184613.jpg"
    assert Path(s["image_path"]).is_file()
    assert sorted(s["captions"]) == [f"ref 184613 {j}" for j in range(6)]
    assert s["sentences"] == [f"karpathy 184613 {j}" for j in range(5)]
    assert src.id_key == "cocoid"
    # the image folder itself as root: image_root/filename
    flat = KarpathyCaptions(kfile, rfile, root / "val2014", split="test")
    assert Path(flat.get("391895")["image_path"]) == root / "val2014" / "COCO_val2014_000000391895.jpg"
    # no references file: the Karpathy raw sentences
    own = KarpathyCaptions(kfile, None, root)
    assert own.get("318219")["captions"] == [f"karpathy 318219 {j}" for j in range(5)]
    assert KarpathyCaptions(kfile, rfile, root, split="train").ids == ["522418"]


def test_karpathy_flickr_ids_follow_references(tmp_path):
    root = tmp_path / "flickr"
    photos = [1000092795, 10002456, 1000268201]
    images, anns = [], []
    for i, pid in enumerate(photos):
        _img(root / "flickr30k_images" / f"{pid}.jpg")
        images.append(_karpathy_entry(i, "flickr30k_images", f"{pid}.jpg", "test", [f"raw {pid} {j}" for j in range(5)]))
        anns += [{"image_id": pid, "caption": f"ref {pid} {j}"} for j in range(5)]
    kfile = _dump(root / "dataset_flickr30k.json", {"images": images})
    rfile = _dump(root / "dataset_flickr30k_coco_style.json", {"images": [], "annotations": anns})
    src = KarpathyCaptions(kfile, rfile, root)
    assert src.id_key == "filename"
    assert src.ids == [str(p) for p in photos]
    assert src.get("10002456")["captions"][0] == "ref 10002456 0"
    assert Path(src.get("10002456")["image_path"]).is_file()
    # without references: imgid, as the brief's default
    assert KarpathyCaptions(kfile, None, root).ids == ["0", "1", "2"]


def test_karpathy_errors_name_the_path(coco, tmp_path):
    root, kfile, rfile = coco
    with pytest.raises(DataError, match="dataset_missing.json"):
        KarpathyCaptions(tmp_path / "dataset_missing.json", rfile, root)
    with pytest.raises(DataError, match="captions_missing.json"):
        KarpathyCaptions(kfile, tmp_path / "captions_missing.json", root)
    with pytest.raises(DataError, match="caption image folder"):
        KarpathyCaptions(kfile, rfile, tmp_path / "nowhere")
    with pytest.raises(DataError, match="splits present"):
        KarpathyCaptions(kfile, rfile, root, split="restval")
    partial = _dump(tmp_path / "partial.json", {"annotations": [{"image_id": 391895, "caption": "x"}]})
    with pytest.raises(DataError, match="no captions for 2"):
        KarpathyCaptions(kfile, partial, root)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        KarpathyCaptions(bad, rfile, root)
    with pytest.raises(DataError, match="'images'"):
        KarpathyCaptions(_dump(tmp_path / "questions.json", {"questions": []}), rfile, root)


def _vqa_answers(words: list[str]) -> list[dict]:
    return [{"answer": w, "answer_confidence": "yes", "answer_id": j + 1} for j, w in enumerate(words)]


def test_vqav2_format(tmp_path):
    root = tmp_path / "vqav2"
    _img(root / "val2014" / "COCO_val2014_000000000042.jpg")
    qs = [{"image_id": 42, "question": "What color is the bus?", "question_id": 42001},
          {"image_id": 42, "question": "How many people?", "question_id": 42000}]
    anns = [{"question_id": 42000, "image_id": 42, "answer_type": "number", "question_type": "how many",
             "multiple_choice_answer": "2", "answers": _vqa_answers(["2"] * 8 + ["two", "3"])},
            {"question_id": 42001, "image_id": 42, "answer_type": "other", "question_type": "what color",
             "multiple_choice_answer": "red", "answers": _vqa_answers(["red"] * 10)}]
    qfile = _dump(root / "v2_OpenEnded_mscoco_val2014_questions.json", {"questions": qs})
    afile = _dump(root / "v2_mscoco_val2014_annotations.json", {"annotations": anns})
    src = VQAQuestions(qfile, afile, root / "val2014", "COCO_val2014_{image_id:012d}.jpg")
    assert src.ids == ["42001", "42000"]  # question-file order
    s = src.get("42000")
    assert s["question"] == "How many people?"
    assert s["answers"] == ["2"] * 8 + ["two", "3"]
    assert s["answer_type"] == "number"
    assert Path(s["image_path"]).is_file()
    with pytest.raises(DataError, match="annotations_file"):
        VQAQuestions(qfile, None, root / "val2014")
    with pytest.raises(DataError, match="missing_ann.json"):
        VQAQuestions(qfile, tmp_path / "missing_ann.json", root / "val2014")
    short = _dump(root / "short.json", {"annotations": anns[:1]})
    with pytest.raises(DataError, match="no annotation for 1 of 2"):
        VQAQuestions(qfile, short, root / "val2014")


def test_textvqa_format(tmp_path):
    root = tmp_path / "textvqa"
    _img(root / "train_images" / "003a8ae2ef43b901.jpg")
    data = [{"question_id": 34602, "question": "what is the brand?", "image_id": "003a8ae2ef43b901",
             "answers": ["nokia"] * 9 + ["NOKIA"], "ocr_tokens": ["nokia"]}]
    qfile = _dump(root / "TextVQA_0.5.1_val.json", {"dataset_name": "textvqa", "data": data})
    src = VQAQuestions(qfile, None, root / "train_images", "{image_id}.jpg")
    assert src.ids == ["34602"]
    s = src.get("34602")
    assert s["answers"][-1] == "NOKIA" and len(s["answers"]) == 10
    assert Path(s["image_path"]).is_file()
    assert "answer_type" not in s
    with pytest.raises(DataError, match="does not fit image_id"):
        VQAQuestions(qfile, None, root / "train_images", "COCO_val2014_{image_id:012d}.jpg")


def test_format_image_name():
    assert format_image_name("COCO_val2014_{image_id:012d}.jpg", 42) == "COCO_val2014_000000000042.jpg"
    assert format_image_name("COCO_val2014_{image_id:012d}.jpg", "42") == "COCO_val2014_000000000042.jpg"
    assert format_image_name("shapes_{image_id:05d}.png", 7) == "shapes_00007.png"
    with pytest.raises(DataError):
        format_image_name("{imgid}.jpg", 7)


def test_image_folder(tmp_path):
    root = tmp_path / "caltech"
    for cls, n in [("Faces_easy", 2), ("accordion", 1), ("BACKGROUND_Google", 1)]:
        for j in range(n):
            _img(root / cls / f"image_{j:04d}.jpg")
    (root / "accordion" / "notes.txt").write_text("not an image")
    src = ImageFolderClasses(root)
    # torchvision order: sorted folder names (upper case first), files sorted within a folder
    assert src.ids == ["BACKGROUND_Google/image_0000", "Faces_easy/image_0000", "Faces_easy/image_0001",
                       "accordion/image_0000"]
    assert src.classnames == ["BACKGROUND Google", "Faces easy", "accordion"]
    s = src.get("accordion/image_0000")
    assert s["label"] == 2 and Path(s["image_path"]).is_file()
    names = tmp_path / "names.txt"
    names.write_text("background\nface\naccordion\n\n")
    assert ImageFolderClasses(root, names).classnames == ["background", "face", "accordion"]
    names.write_text("face\naccordion\n")
    with pytest.raises(DataError, match="2 class names but there are 3"):
        ImageFolderClasses(root, names)
    with pytest.raises(DataError, match="names_missing.txt"):
        ImageFolderClasses(root, tmp_path / "names_missing.txt")
    with pytest.raises(DataError, match="no_such_root"):
        ImageFolderClasses(tmp_path / "no_such_root")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        ImageFolderClasses(tmp_path / "empty")


def test_loaders_read_the_shapes_world(tmp_path):
    """The synthetic data set goes through the very same loaders as COCO / VQAv2 / ImageNet."""
    from evaluators.datasets.shapes import CLASSNAMES, generate_shapes

    root = generate_shapes(tmp_path / "shapes", n_train=2, n_test=3, size=16, seed=1)
    caps = KarpathyCaptions(root / "dataset_shapes.json", root / "captions_shapes.json", root, split="test")
    assert caps.ids == ["2", "3", "4"]
    for sid in caps.ids:
        s = caps.get(sid)
        assert Path(s["image_path"]).is_file() and len(s["captions"]) == 5
        assert s["captions"] == s["sentences"]
    vqa = VQAQuestions(root / "vqa" / "questions_test.json", root / "vqa" / "annotations_test.json",
                       root / "images", "shapes_{image_id:05d}.png")
    assert len(vqa.ids) >= 3
    for sid in vqa.ids:
        s = vqa.get(sid)
        assert Path(s["image_path"]).is_file() and len(s["answers"]) == 10 and s["question"].endswith("?")
    cls = ImageFolderClasses(root / "classes" / "test", root / "classes" / "classnames.txt")
    assert cls.classnames == list(CLASSNAMES)
    assert len(cls.ids) == 3
    assert all(Path(cls.get(i)["image_path"]).is_file() for i in cls.ids)


# ------------------------------------------------------------------ shipped class lists, real layouts


def test_demonstrations_come_from_the_train_files(tmp_path):
    from tests.real_layouts import build_coco, build_textvqa, build_vqav2

    build_coco(tmp_path / "coco")
    caps = KarpathyCaptions(tmp_path / "coco" / "dataset_coco.json", None, tmp_path / "coco")
    assert caps.demonstrations() == [{"caption": "a train caption."}]  # train only, not restval
    build_vqav2(tmp_path / "vqav2")
    v = tmp_path / "vqav2"
    vqa = VQAQuestions(v / "v2_OpenEnded_mscoco_val2014_questions.json", v / "v2_mscoco_val2014_annotations.json",
                       v / "val2014", demo_questions_file=v / "v2_OpenEnded_mscoco_train2014_questions.json",
                       demo_annotations_file=v / "v2_mscoco_train2014_annotations.json")
    assert vqa.demonstrations() == [{"question": "What color is the shape?", "answer": "red"},
                                    {"question": "Is there a shape?", "answer": "yes"}]
    build_textvqa(tmp_path / "textvqa")
    t = tmp_path / "textvqa"
    tv = VQAQuestions(t / "TextVQA_0.5.1_val.json", None, t / "train_images", "{image_id}.jpg",
                      demo_questions_file=t / "TextVQA_0.5.1_train.json")
    assert tv.demonstrations() == [{"question": "what is written on the sign?", "answer": "stop"}]
    no_train = VQAQuestions(v / "v2_OpenEnded_mscoco_val2014_questions.json", v / "v2_mscoco_val2014_annotations.json",
                            v / "val2014", demo_questions_file=v / "v2_OpenEnded_mscoco_train2014_questions.json",
                            demo_annotations_file=v / "absent_train_annotations.json")
    with pytest.raises(DataError, match="absent_train_annotations.json"):
        no_train.demonstrations()
    data = json.loads((tmp_path / "coco" / "dataset_coco.json").read_text())
    data["images"] = [e for e in data["images"] if e["split"] != "train"]
    only_test = _dump(tmp_path / "test_only.json", data)
    with pytest.raises(DataError, match="test_only.json has no images in split 'train'"):
        KarpathyCaptions(only_test, None, tmp_path / "coco").demonstrations()


def test_shapes_world_has_demonstrations(tmp_path):
    from evaluators.datasets.shapes import generate_shapes

    root = generate_shapes(tmp_path / "shapes", n_train=2, n_test=1, size=16, seed=1)
    caps = KarpathyCaptions(root / "dataset_shapes.json", root / "captions_shapes.json", root, split="test")
    assert len(caps.demonstrations()) == 2
    vqa = VQAQuestions(root / "vqa" / "questions_test.json", root / "vqa" / "annotations_test.json",
                       root / "images", "shapes_{image_id:05d}.png",
                       root / "vqa" / "questions_train.json", root / "vqa" / "annotations_train.json")
    demos = vqa.demonstrations()
    assert demos and all(set(d) == {"question", "answer"} and d["answer"] for d in demos)


@pytest.mark.parametrize("corrupt, message", [
    (lambda t: t[: len(t) // 2], r"TextVQA_0.5.1_val.json is not valid JSON \(truncated"),
    (lambda t: t.replace('"question_id"', '"qid"'), r"TextVQA_0.5.1_val.json: a TextVQA entry lacks the field "
                                                    r"'question_id'"),
    (lambda t: t.replace('"data"', '"rows"'), r"TextVQA_0.5.1_val.json has neither"),
    (lambda t: t.replace('"answers": [', '"answers": 7, "x": ['), r"question 34602 has no 'answers' list"),
])
def test_malformed_annotation_files_give_one_line(tmp_path, corrupt, message):
    from tests.real_layouts import build_textvqa

    build_textvqa(tmp_path)
    qfile = tmp_path / "TextVQA_0.5.1_val.json"
    qfile.write_text(corrupt(qfile.read_text()))
    with pytest.raises(DataError, match=message) as err:
        VQAQuestions(qfile, None, tmp_path / "train_images", "{image_id}.jpg")
    assert "\n" not in str(err.value)


def test_malformed_vqav2_and_coco_fields(tmp_path):
    from tests.real_layouts import build_coco, build_vqav2

    build_vqav2(tmp_path / "v", train=False)
    v = tmp_path / "v"
    afile = v / "v2_mscoco_val2014_annotations.json"
    afile.write_text(afile.read_text().replace('"answer":', '"ans":', 1))
    with pytest.raises(DataError, match="v2_mscoco_val2014_annotations.json: question .* malformed field 'answers'"):
        VQAQuestions(v / "v2_OpenEnded_mscoco_val2014_questions.json", afile, v / "val2014")
    build_coco(tmp_path / "c")
    rfile = tmp_path / "c" / "annotations" / "captions_val2014.json"
    rfile.write_text(rfile.read_text().replace('"caption":', '"text":'))
    with pytest.raises(DataError, match="captions_val2014.json: an annotation lacks 'caption'"):
        KarpathyCaptions(tmp_path / "c" / "dataset_coco.json", rfile, tmp_path / "c")
    kfile = _dump(tmp_path / "k.json", {"images": ["COCO_val2014_000000391895.jpg"]})
    with pytest.raises(DataError, match=r"k.json: 'images'\[0\] is a str, not an object"):
        KarpathyCaptions(kfile, None, tmp_path / "c")


def test_prepared_manifest_is_checked_and_never_overwritten(tmp_path, coco):
    from evaluators.datasets import manifests

    root, kfile, rfile = coco
    src = KarpathyCaptions(kfile, rfile, root)
    path = manifests.write_prepared(tmp_path / "m", src, "captioning", 2, 42)
    assert path.name == "captioning_n2_seed42.json"
    run = manifests.evaluated_subset(src, "captioning", 2, 42, tmp_path / "m")
    assert run["ids"] == json.loads(path.read_text())["ids"] and run["prepared"] == str(path)
    whole = manifests.evaluated_subset(src, "captioning", None, 42, tmp_path / "m")
    assert sorted(whole["ids"]) == sorted(src.ids) and whole["prepared"] is None
    record = json.loads(path.read_text())
    record["ids"] = record["ids"][::-1]
    path.write_text(json.dumps(record))
    with pytest.raises(DataError, match="captioning_n2_seed42.json lists other captioning samples"):
        manifests.evaluated_subset(src, "captioning", 2, 42, tmp_path / "m")
    with pytest.raises(DataError, match="lists other"):
        manifests.write_prepared(tmp_path / "m", src, "captioning", 2, 42)
    assert json.loads(path.read_text())["ids"] == record["ids"]  # left as it was
