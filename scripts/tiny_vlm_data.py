"""The shapes world's train/test splits as the tiny-model training reads them: PIL images, ids, labels, the five
captions and the VQA items of a split, and the pixels at a model's resolution (the processors' bicubic resize)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image


def load_split(root: Path, split: str) -> dict[str, Any]:
    """PIL images, ids, labels, 5 captions each and the split's VQA items (question, majority, 10 answers)."""
    entries = [e for e in json.loads((root / "dataset_shapes.json").read_text())["images"] if e["split"] == split]
    scenes = {s["imgid"]: s for s in json.loads((root / "scenes_shapes.json").read_text())["scenes"]}
    row = {e["imgid"]: i for i, e in enumerate(entries)}
    qs = json.loads((root / "vqa" / f"questions_{split}.json").read_text())["questions"]
    anns = {a["question_id"]: a for a in
            json.loads((root / "vqa" / f"annotations_{split}.json").read_text())["annotations"]}
    vqa = [{"row": row[q["image_id"]], "question": q["question"], "qid": q["question_id"],
            "answer": anns[q["question_id"]]["multiple_choice_answer"],
            "answers": [a["answer"] for a in anns[q["question_id"]]["answers"]]} for q in qs]
    return {"images": [Image.open(root / e["filepath"] / e["filename"]).convert("RGB") for e in entries],
            "imgids": [e["imgid"] for e in entries],
            "labels": torch.tensor([scenes[e["imgid"]]["label"] for e in entries]),
            "captions": [[s["raw"] for s in e["sentences"]] for e in entries], "vqa": vqa}


def merge_splits(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """``a`` followed by ``b`` (image rows of ``b``'s VQA items shifted past ``a``'s images)."""
    shift = len(a["images"])
    return {"images": a["images"] + b["images"], "imgids": a["imgids"] + b["imgids"],
            "labels": torch.cat([a["labels"], b["labels"]]), "captions": a["captions"] + b["captions"],
            "vqa": a["vqa"] + [{**v, "row": v["row"] + shift} for v in b["vqa"]]}


def to_pixels(images: list[Image.Image], resolution: int) -> torch.Tensor:
    """(N,3,R,R) pixels in [0, 1]: the processors' bicubic resize, before any normalisation."""
    arr = np.stack([np.asarray(im.resize((resolution, resolution), Image.Resampling.BICUBIC)) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(255.0)
