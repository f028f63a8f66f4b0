"""The shapes world's train/test splits as the tiny-model training reads them: PIL images, ids, labels, the five
captions and the VQA items of a split, the pixels at a model's resolution (the processors' bicubic resize), and the
training batches (half captions, half VQA; labels on the target tokens only)."""

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


def sample_items(train: dict[str, Any], rng: np.random.Generator, batch: int) -> list[tuple[int, str, str, str]]:
    """Half captions, half VQA items: (image row, kind, question or '', target)."""
    n, vqa, half = len(train["captions"]), train["vqa"], max(1, batch // 2)
    items = [(int(i), "caption", "", train["captions"][i][int(rng.integers(5))]) for i in rng.choice(n, half, replace=False)]
    items += [(vqa[i]["row"], "vqa", vqa[i]["question"], vqa[i]["answer"]) for i in rng.choice(len(vqa), batch - half, replace=False)]
    return items


def masked_batch(tok, prompts: list[str], targets: list[str]) -> dict[str, torch.Tensor]:
    """Right-padded ids of prompt + target with labels on the target tokens only (-100 elsewhere)."""
    ids, labels = [], []
    for p, t in zip(prompts, targets, strict=True):
        p_ids = tok(p)["input_ids"]
        full = tok(p + t)["input_ids"]
        if full[: len(p_ids)] != p_ids:
            raise ValueError(f"the prompt's tokens change when the target is appended: {p!r} + {t!r}")
        ids.append(full)
        labels.append([-100] * len(p_ids) + full[len(p_ids):])
    width = max(map(len, ids))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    return {"input_ids": torch.tensor([s + [pad] * (width - len(s)) for s in ids]),
            "attention_mask": torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in ids]),
            "labels": torch.tensor([s + [-100] * (width - len(s)) for s in labels])}
