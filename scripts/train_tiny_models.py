"""Train TinyCLIP, then TinyVLM on its frozen vision tower, on the shapes world (CPU), evaluate both on the
test split, and write the checkpoints plus ``README.md`` (command, time, sha256, test numbers).

Example (the committed checkpoints): python scripts/train_tiny_models.py --data data/shapes --out checkpoints
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import re
import shlex
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from evaluators.datasets.shapes import CLASSNAMES, generate_shapes
from evaluators.errors import cli
from evaluators.vlms.tiny import (
    CAPTION_PROMPT,
    CLASS_TEMPLATES,
    VQA_PROMPT,
    TinyCLIP,
    TinyCLIPConfig,
    TinyVLM,
    TinyVLMConfig,
    WordTokenizer,
)

log = logging.getLogger("train_tiny_models")


# ---------------------------------------------------------------------------------------------- data


def load_split(root: Path, split: str) -> dict[str, Any]:
    """Images (N,3,S,S) uint8, labels, 5 captions each, and the split's VQA items."""
    karpathy = json.loads((root / "dataset_shapes.json").read_text())["images"]
    entries = [e for e in karpathy if e["split"] == split]
    scenes = {s["imgid"]: s for s in json.loads((root / "scenes_shapes.json").read_text())["scenes"]}
    imgs = np.stack(
        [np.asarray(Image.open(root / e["filepath"] / e["filename"]).convert("RGB")) for e in entries]
    )
    row = {e["imgid"]: i for i, e in enumerate(entries)}
    qs = json.loads((root / "vqa" / f"questions_{split}.json").read_text())["questions"]
    anns = {
        a["question_id"]: a
        for a in json.loads((root / "vqa" / f"annotations_{split}.json").read_text())["annotations"]
    }
    vqa = [
        {
            "row": row[q["image_id"]],
            "question": q["question"],
            "answer": anns[q["question_id"]]["multiple_choice_answer"],
            "answers": [a["answer"] for a in anns[q["question_id"]]["answers"]],
        }
        for q in qs
    ]
    return {
        "images": torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous(),
        "imgids": [e["imgid"] for e in entries],
        "labels": torch.tensor([scenes[e["imgid"]]["label"] for e in entries]),
        "captions": [[s["raw"] for s in e["sentences"]] for e in entries],
        "vqa": vqa,
    }


def build_tokenizer(train: dict[str, Any]) -> WordTokenizer:
    """Vocabulary from the train captions, the class prompts, the prompts and the train VQA items."""
    texts = [c for caps in train["captions"] for c in caps]
    texts += [t.format(c) for c in CLASSNAMES for t in CLASS_TEMPLATES]
    texts += [CAPTION_PROMPT, VQA_PROMPT.format("")]
    texts += [v["question"] for v in train["vqa"]] + [v["answer"] for v in train["vqa"]]
    return WordTokenizer.build(texts)


def pixels(images: torch.Tensor) -> torch.Tensor:
    return images.float().div(255.0)


def lr_at(step: int, steps: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


# ------------------------------------------------------------------------------------------ training


def train_clip(
    clip: TinyCLIP,
    train: dict[str, Any],
    steps: int,
    batch: int,
    lr: float,
    seed: int,
    captioner: TinyVLM | None = None,
    caption_weight: float = 1.0,
) -> None:
    """InfoNCE on (image, one of its captions); with ``captioner`` (a TinyVLM around ``clip``) also the
    captioning loss of another caption through the same vision tower, as in CoCa. Contrastive batches
    alone leave the tiny encoder blind to shape (colour separates most pairs of a batch), and then the
    text tower learns to ignore the shape words too; the per-word captioning loss breaks that tie."""
    rng = np.random.default_rng(seed)
    for prm in clip.parameters():  # a TinyVLM built around the CLIP froze it
        prm.requires_grad_(True)
    params = list(clip.parameters())
    if captioner is not None:
        params += [prm for name, prm in captioner.named_parameters() if not name.startswith("clip.")]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    n = len(train["captions"])
    clip.train()
    t0 = time.perf_counter()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, max(1, steps // 20))
        idx = rng.choice(n, size=min(batch, n), replace=False)
        picks = [rng.choice(5, size=2, replace=False) for _ in idx]
        texts = [train["captions"][i][int(k[0])] for i, k in zip(idx, picks, strict=True)]
        emb, tokens = clip.encode_image(pixels(train["images"][idx]))
        loss = clip.contrastive_loss_from_embeddings(emb, texts)
        cap = torch.zeros(())
        if captioner is not None:
            targets = [train["captions"][i][int(k[1])] for i, k in zip(idx, picks, strict=True)]
            feats = captioner.pool_vision_tokens(tokens)
            cap = captioner.sequence_loss(feats, [CAPTION_PROMPT] * len(idx), targets).mean()
            loss = loss + caption_weight * cap
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            log.info("clip step %d/%d loss %.4f (caption %.4f) scale %.1f (%.0f s)", step, steps, loss.item(),
                     cap.item(), clip.logit_scale.exp().item(), time.perf_counter() - t0)  # fmt: skip
    clip.eval()
    for prm in clip.parameters():
        prm.requires_grad_(False)


@torch.no_grad()
def vision_cache(vlm: TinyVLM, images: torch.Tensor, chunk: int = 250) -> torch.Tensor:
    return torch.cat(
        [vlm.vision_features(pixels(images[i : i + chunk])) for i in range(0, len(images), chunk)]
    )


def train_vlm(vlm: TinyVLM, train: dict[str, Any], steps: int, batch: int, lr: float, seed: int) -> None:
    """Captioning and VQA items mixed half and half; the frozen vision features are computed once."""
    rng = np.random.default_rng(seed + 1)
    feats = vision_cache(vlm, train["images"])
    params = [p for p in vlm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    n, vqa = len(train["captions"]), train["vqa"]
    half = max(1, batch // 2)
    vlm.train()
    t0 = time.perf_counter()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, max(1, steps // 20))
        ci = rng.choice(n, size=min(half, n), replace=False)
        qi = rng.choice(len(vqa), size=min(half, len(vqa)), replace=False)
        rows = list(ci) + [vqa[i]["row"] for i in qi]
        prompts = [CAPTION_PROMPT] * len(ci) + [VQA_PROMPT.format(vqa[i]["question"]) for i in qi]
        targets = [train["captions"][i][int(rng.integers(5))] for i in ci] + [vqa[i]["answer"] for i in qi]
        loss = vlm.sequence_loss(feats[rows], prompts, targets).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            log.info("vlm step %d/%d loss %.4f (%.0f s)", step, steps, loss.item(), time.perf_counter() - t0)
    vlm.eval()


# ---------------------------------------------------------------------------------------- evaluation

_NUMS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5"}


def _norm_answer(a: str) -> str:
    """A rough VQA answer normalisation (lowercase, punctuation, articles, number words); the harness's
    metric module holds the official one."""
    words = re.sub(r"[^\w\s]", " ", a.lower()).split()
    return " ".join(_NUMS.get(w, w) for w in words if w not in ("a", "an", "the"))


def vqa_accuracy(preds: list[str], answers: list[list[str]]) -> float:
    """Mean over the 10 leave-one-out subsets of min(1, matches / 3), with the rough normalisation."""
    total = 0.0
    for p, gts in zip(preds, answers, strict=True):
        p, gts = _norm_answer(p), [_norm_answer(g) for g in gts]
        total += float(
            np.mean([min(1.0, sum(g == p for j, g in enumerate(gts) if j != k) / 3) for k in range(10)])
        )
    return 100.0 * total / max(1, len(preds))


def cider(preds: dict[int, str], refs: dict[int, list[str]]) -> float:
    """CIDEr-D x100 with pycocoevalcap after its PTB tokenizer (Java), idf from these references."""
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in refs.items()})
    res = tok.tokenize({k: [{"caption": preds[k]}] for k in refs})
    score, _ = Cider().compute_score(gts, res)
    return 100.0 * float(score)


@torch.no_grad()
def evaluate(
    clip: TinyCLIP, vlm: TinyVLM | None, train: dict[str, Any], test: dict[str, Any], chunk: int = 100
) -> dict[str, Any]:
    x = pixels(test["images"])
    n = len(x)
    logits = torch.cat([clip.classify(x[i : i + chunk], list(CLASSNAMES)) for i in range(0, n, chunk)])
    out: dict[str, Any] = {
        "n_test_images": n,
        "zero_shot_top1": 100.0 * float((logits.argmax(1) == test["labels"]).float().mean()),
        "zero_shot_chance": 100.0 / len(CLASSNAMES),
    }
    if vlm is None:
        return out
    caps = [c for i in range(0, n, chunk) for c in vlm.caption(x[i : i + chunk])]
    refs = dict(zip(test["imgids"], test["captions"], strict=True))
    common = Counter(c for cs in train["captions"] for c in cs).most_common(1)[0][0]
    out["cider"] = cider(dict(zip(test["imgids"], caps, strict=True)), refs)
    out["cider_trivial"] = cider(dict.fromkeys(test["imgids"], common), refs)
    out["trivial_caption"] = common
    out["example_captions"] = {str(k): c for k, c in list(zip(test["imgids"], caps, strict=True))[:5]}
    vqa = test["vqa"]
    preds = []
    for i in range(0, len(vqa), chunk):
        items = vqa[i : i + chunk]
        preds += vlm.answer(x[[v["row"] for v in items]], [v["question"] for v in items])
    out["n_test_questions"] = len(vqa)
    out["vqa_accuracy"] = vqa_accuracy(preds, [v["answers"] for v in vqa])
    out["vqa_exact_match"] = 100.0 * float(
        np.mean([_norm_answer(p) == _norm_answer(v["answer"]) for p, v in zip(preds, vqa, strict=True)])
    )
    # trivial VQA baseline: the most common train answer of the question's first three words
    prior: dict[str, Counter] = {}
    for v in train["vqa"]:
        prior.setdefault(" ".join(v["question"].lower().split()[:3]), Counter())[v["answer"]] += 1
    trivial = [
        prior.get(" ".join(v["question"].lower().split()[:3]), Counter({"yes": 1})).most_common(1)[0][0]
        for v in vqa
    ]
    out["vqa_accuracy_trivial"] = vqa_accuracy(trivial, [v["answers"] for v in vqa])
    return out


# ---------------------------------------------------------------------------------------------- main


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_readme(
    out: Path, command: str, seconds: dict[str, float], metrics: dict[str, Any], args: argparse.Namespace
) -> None:
    lines = [
        "# Tiny models for the shapes world",
        "",
        "Made by `scripts/train_tiny_models.py` on the CPU; weights are safetensors (loaded without pickle).",
        "",
        "Recipe: stage 1 trains TinyCLIP (InfoNCE, learned temperature) together with a CoCa-style captioning",
        "loss through the TinyVLM decoder on the same vision tower; stage 2 freezes the CLIP and trains the",
        "TinyVLM projector and decoder on captions and VQA answers (half and half per batch). Data: the shapes",
        "world's train split only (generated with seed 0, `evaluators.datasets.shapes.generate_shapes`); the",
        "numbers below are on its test split. Times are wall-clock seconds and depend on the machine's load;",
        "the same command on another machine need not give bit-identical weights (the hashes below are of",
        "the committed files).",
        "",
        "Command:",
        "",
        "```",
        command,
        "```",
        "",
        f"Training time: {seconds['total']:.0f} s in all (TinyCLIP {seconds['clip']:.0f} s, TinyVLM {seconds['vlm']:.0f} s, "
        f"evaluation {seconds['eval']:.0f} s) with {args.threads} thread(s).",
        "",
        "| model | file | sha256 |",
        "|---|---|---|",
    ]
    for name in ("tiny_clip", "tiny_vlm"):
        f = out / name / "model.safetensors"
        if f.is_file():
            lines.append(f"| {name} | {name}/model.safetensors | {sha256(f)} |")
    if "zero_shot_top1" in metrics:
        lines += ["", f"Test split of the shapes world ({metrics['n_test_images']} images):", ""]
        lines.append(f"- TinyCLIP zero-shot top-1: {metrics['zero_shot_top1']:.1f} % "
                     f"(chance {metrics['zero_shot_chance']:.1f} %)")  # fmt: skip
    if "cider" in metrics:
        lines.append(f"- TinyVLM captioning CIDEr: {metrics['cider']:.1f}; trivial baseline (always the most common "
                     f"train caption, \"{metrics['trivial_caption']}\"): {metrics['cider_trivial']:.1f}")  # fmt: skip
        lines.append(f"- TinyVLM VQA accuracy ({metrics['n_test_questions']} questions, 10-answer leave-one-out "
                     f"min(1, matches/3), rough normalisation): {metrics['vqa_accuracy']:.1f} %; exact match with "
                     f"the majority answer: {metrics['vqa_exact_match']:.1f} %; trivial baseline (most common "
                     f"train answer per question type): {metrics['vqa_accuracy_trivial']:.1f} %")  # fmt: skip
        lines += ["", "Example captions (test images):", ""]
        lines += [f"- {k}: {v}" for k, v in metrics["example_captions"].items()]
    lines += ["", "Full numbers: `tiny_models_metrics.json`.", ""]
    (out / "README.md").write_text("\n".join(lines))
    (out / "tiny_models_metrics.json").write_text(
        json.dumps({"metrics": metrics, "seconds": seconds, "command": command}, indent=2)
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="shapes world folder (generated there if missing)")
    ap.add_argument(
        "--out", required=True, help="checkpoints folder: writes tiny_clip/, tiny_vlm/, README.md"
    )
    ap.add_argument("--n-train", type=int, default=4000)
    ap.add_argument("--n-test", type=int, default=500)
    ap.add_argument("--clip-steps", type=int, default=800)
    ap.add_argument("--clip-batch", type=int, default=96)
    ap.add_argument("--clip-lr", type=float, default=2e-3)
    ap.add_argument("--caption-weight", type=float, default=1.0, help="CoCa-style captioning loss in stage 1")
    ap.add_argument("--vlm-steps", type=int, default=800)
    ap.add_argument("--vlm-batch", type=int, default=96, help="half captions, half VQA items")
    ap.add_argument("--vlm-lr", type=float, default=1e-3)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-eval", action="store_true", help="skip the test-split evaluation")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data, out = Path(args.data), Path(args.out)
    command = "python scripts/train_tiny_models.py " + shlex.join(sys.argv[1:] if argv is None else argv)

    t_start = time.perf_counter()
    generate_shapes(data, n_train=args.n_train, n_test=args.n_test, seed=0)
    train, test = load_split(data, "train"), load_split(data, "test")
    tok = build_tokenizer(train)
    log.info(
        "%d train / %d test images, vocabulary %d words", len(train["imgids"]), len(test["imgids"]), len(tok)
    )

    clip = TinyCLIP(TinyCLIPConfig(vocab_size=len(tok)), tok)
    cfg = TinyVLMConfig(clip=clip.config, d_model=args.d_model, n_layers=args.layers)
    vlm = TinyVLM(cfg, tok, clip=clip) if args.vlm_steps > 0 or args.caption_weight > 0 else None
    # stage 1: the CLIP (with the VLM's decoder as its captioning head when caption_weight > 0)
    captioner = vlm if args.caption_weight > 0 else None
    train_clip(
        clip, train, args.clip_steps, args.clip_batch, args.clip_lr, args.seed, captioner, args.caption_weight
    )
    clip.save_pretrained(out / "tiny_clip")
    t_clip = time.perf_counter()
    # stage 2: the CLIP frozen; projector and decoder on captions and VQA
    if args.vlm_steps > 0 and vlm is not None:
        train_vlm(vlm, train, args.vlm_steps, args.vlm_batch, args.vlm_lr, args.seed)
        vlm.save_pretrained(out / "tiny_vlm")
    else:
        vlm = None
    t_vlm = time.perf_counter()

    metrics = {} if args.no_eval else evaluate(clip, vlm, train, test)
    t_end = time.perf_counter()
    seconds = {
        "clip": t_clip - t_start,
        "vlm": t_vlm - t_clip,
        "eval": t_end - t_vlm,
        "total": t_end - t_start,
    }
    write_readme(out, command, seconds, metrics, args)
    log.info("test metrics: %s", json.dumps(metrics))
    if argv is None:
        print(json.dumps({"seconds": seconds, "metrics": metrics}, indent=2))
    return {"seconds": seconds, "metrics": metrics}


if __name__ == "__main__":
    cli(main)
