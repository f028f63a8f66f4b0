"""Train the shapes world's tiny LLaVA, tiny OpenFlamingo and tiny CLIP on the CPU (train split only) and save
them in their published layouts with a sha256 manifest per folder.

    python scripts/train_tiny_vlms.py --data data/shapes --out checkpoints
LLaVA and OpenFlamingo learn captions and short VQA answers in their own prompt formats (loss on the answer
tokens only); CLIP learns InfoNCE on (image, caption) pairs plus zero-shot classification against its class
prompts. The CLIP is trained first, from scratch; the LLaVA and OpenFlamingo vision towers start from its
vision tower (as the real ones start from a pretrained CLIP), their projector/perceiver, cross-attention and
LMs from scratch (nothing pretrained exists for this world), and all of it is trained, unlike the real
models' frozen towers and LMs. The file formats are unchanged.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import tiny_vlm_builders as B  # noqa: E402
import tiny_vlm_init as I  # noqa: E402
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from tiny_vlm_data import load_split, masked_batch, merge_splits, sample_items, to_pixels

from evaluators.config import PROJECT_ROOT
from evaluators.datasets.shapes import CLASSNAMES, generate_shapes  # noqa: E402
from evaluators.errors import ConfigError, cli  # noqa: E402
from evaluators.vlms.base import Turn
from evaluators.vlms.openflamingo import format_turns

log = logging.getLogger("train_tiny_vlms")

CAPTION_USER = "Provide a short caption for this image."
VQA_USER = "{question}\nAnswer the question using a single word or phrase."
#: The zero-shot templates, read from the data set config that the evaluation uses (one copy).
CLASS_TEMPLATES = tuple(OmegaConf.load(PROJECT_ROOT / "configs/prompts/templates/shapes.yaml").templates)


# ------------------------------------------------------------------------------------------------ data


def corpus(train: dict[str, Any]) -> list[str]:
    """Every text the models see in training: captions, questions, answers, prompts, class prompts."""
    texts = [c for cs in train["captions"] for c in cs]
    texts += [v["question"] + " " + v["answer"] for v in train["vqa"]]
    texts += [t.format(c) for c in CLASSNAMES for t in CLASS_TEMPLATES]
    texts += [f"USER: \n{CAPTION_USER} ASSISTANT:", VQA_USER, "Output: Question: Short answer:"] * 50
    return texts


def lr_at(step: int, steps: int, base: float) -> float:
    warm = max(1, steps // 20)
    return base * (step + 1) / warm if step < warm else base * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


def optimise(groups: list[tuple[list[torch.nn.Parameter], float]], steps: int, lr: float, loss_at, name: str,
             before_step: Callable[[int], None] | None = None) -> None:
    """AdamW with warm-up + cosine decay over ``(parameters, lr multiplier)`` groups; ``loss_at(step)`` returns
    the batch loss (parameters without a gradient at a step, e.g. a still frozen tower, are left alone);
    ``before_step(step)`` observes the model before each step (snapshots for learning curves)."""
    opt = torch.optim.AdamW([{"params": ps, "mult": m} for ps, m in groups], lr=lr, weight_decay=0.01)
    params = [p for ps, _ in groups for p in ps]
    t0 = time.perf_counter()
    for step in range(steps):
        if before_step is not None:
            before_step(step)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr) * g["mult"]
        loss = loss_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], 1.0)
        opt.step()
        if step % 10 == 0 or step == steps - 1:
            log.info("%s step %d/%d loss %.4f (%.0f s)", name, step, steps, loss.item(), time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------------ LLaVA


def llava_prompt(proc, user: str) -> str:
    """The chat template's prompt: "USER: <image>\\n{user} ASSISTANT:"."""
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": user}]}]
    return proc.apply_chat_template(conv, add_generation_prompt=True)


def expand_image_tokens(proc, prompt: str) -> str:
    """What LlavaProcessor does to the text when images are given: one <image> per vision feature."""
    n = (proc.image_processor.crop_size["height"] // proc.patch_size) ** 2
    return prompt.replace(proc.image_token, proc.image_token * n)


def llava_loss(model, proc, x: torch.Tensor, users: list[str], targets: list[str]) -> torch.Tensor:
    """Mean cross-entropy of " {target}</s>" after the chat prompt, for pixels ``x`` in [0, 1]."""
    prompts = [expand_image_tokens(proc, llava_prompt(proc, u)) for u in users]
    batch = masked_batch(proc.tokenizer, prompts, [" " + t + proc.tokenizer.eos_token for t in targets])
    return model(pixel_values=B.normalize(x), **batch).loss


def train_llava(train: dict[str, Any], bpe, steps: int, batch: int, lr: float, seed: int,
                vision_init: Path | None = None, freeze_vision_steps: int = 0, projector_lr_mult: float = 1.0,
                snapshot: Callable[[int, Any, Any], None] | None = None):
    """From ``vision_init`` (a tiny CLIP folder) the tower starts pretrained and stays frozen for the first
    ``freeze_vision_steps`` (LLaVA's alignment stage; the LM trains there too, being untrained here)."""
    model, proc = B.build_llava(bpe)
    if vision_init is not None:
        I.init_llava_tower(model, vision_init)
    pix = to_pixels(train["images"], B.LLAVA_RES)
    rng = np.random.default_rng(seed)
    model.train()
    tower = model.vision_tower
    tower.requires_grad_(freeze_vision_steps == 0)
    proj = list(model.multi_modal_projector.parameters())
    ids = {id(p) for p in proj}

    def loss_at(step: int) -> torch.Tensor:
        if step == freeze_vision_steps:
            tower.requires_grad_(True)
        items = sample_items(train, rng, batch)
        users = [CAPTION_USER if k == "caption" else VQA_USER.format(question=q) for _, k, q, _ in items]
        return llava_loss(model, proc, pix[[r for r, *_ in items]], users, [t for *_, t in items])

    rest = [p for p in model.parameters() if id(p) not in ids]
    optimise([(rest, 1.0), (proj, projector_lr_mult)], steps, lr, loss_at, "llava",
             None if snapshot is None else lambda step: snapshot(step, model, proc))
    return model.eval(), proc


# ------------------------------------------------------------------------------------------ OpenFlamingo


def of_user(kind: str, question: str) -> str:
    """The task's OpenFlamingo user text (configs/prompts): "Output:" or "Question:{q} Short answer:"."""
    return "Output:" if kind == "caption" else f"Question:{question} Short answer:"


def of_prompt(kind: str, question: str, demos: list[tuple[str, str]]) -> str:
    """The prompt the harness sends: text-only demonstrations ``(question, answer)``, then the image turn, framed
    by the adapter's own ``format_turns`` (so training and evaluation prompts are the same strings)."""
    turns = [Turn(user=of_user(kind, q), assistant=a, image=False) for q, a in demos]
    return format_turns([*turns, Turn(user=of_user(kind, question))])


def of_loss(model, tok, x: torch.Tensor, prompts: list[str], targets: list[str]) -> torch.Tensor:
    """Mean cross-entropy of ``target + <|endofchunk|>`` after each prompt (one image per prompt)."""
    batch = masked_batch(tok, prompts, [t + "<|endofchunk|>" for t in targets])
    B.encode_vision_with_grad(model, B.normalize(x)[:, None, None])
    model._condition_media_locations(input_ids=batch["input_ids"])
    try:
        return model.lang_encoder(**batch).loss
    finally:
        model.lang_encoder.clear_conditioned_layers()


def train_openflamingo(train: dict[str, Any], bpe, folder: Path, steps: int, batch: int, lr: float, seed: int,
                       vision_init: Path | None = None, gate_init: float = 0.0, gate_lr_mult: float = 1.0,
                       snapshot: Callable[[int, Any, Any], None] | None = None, latent_std: float = 1.0,
                       start_from: Path | None = None):
    """From ``vision_init`` the tower starts as the tiny CLIP's. ``gate_init`` sets the tanh gates of the
    cross-attention layers: the package starts them at 0 so that a pretrained, frozen LM is unchanged at the
    start; here the LM is untrained, so that reason does not apply, and gates at 0 stay near 0 (the image is
    ignored) in a CPU-sized run. ``gate_lr_mult`` scales their learning rate. ``latent_std``: the perceiver's
    learned latents start as N(0, latent_std^2) (package: 1); with 1 its output hardly depends on the image at
    the start (7 % of its variance is across images), with 0.02 a quarter of it is. ``start_from``: a saved
    tiny OpenFlamingo folder to continue training (a second stage; the initialisation options are ignored)."""
    folder.mkdir(parents=True, exist_ok=True)
    if start_from is not None:
        shutil.copytree(start_from, folder, dirs_exist_ok=True, ignore=shutil.ignore_patterns("SHA256SUMS"))
    else:
        (folder / f"{B.OF_VISION_NAME}.json").write_text(json.dumps(B.of_vision_config(), indent=2))
        B.save_lm(bpe, folder / "lm")
    model, tok = B.load_openflamingo(folder)
    gates = [p for n, p in model.named_parameters() if n.endswith(("attn_gate", "ff_gate"))]
    if start_from is None:
        if vision_init is not None:
            I.init_openflamingo_tower(model, vision_init)
        with torch.no_grad():
            for g in gates:
                g.fill_(gate_init)
            model.perceiver.latents.normal_(0.0, latent_std)
    tok.padding_side = "right"
    model.requires_grad_(True)
    pix = to_pixels(train["images"], B.OF_RES)
    rng = np.random.default_rng(seed + 1)
    model.train()

    def loss_at(step: int) -> torch.Tensor:
        items = sample_items(train, rng, batch)
        prompts = []
        for _, kind, q, _ in items:  # 0-2 text-only demonstrations of the same task, as the evaluation uses
            demos = []
            for _ in range(int(rng.integers(3))):
                j = int(rng.integers(len(train["captions"]))) if kind == "caption" else int(rng.integers(len(train["vqa"])))
                demos.append(("", train["captions"][j][0]) if kind == "caption" else
                             (train["vqa"][j]["question"], train["vqa"][j]["answer"]))
            prompts.append(of_prompt(kind, q, demos))
        return of_loss(model, tok, pix[[r for r, *_ in items]], prompts, [t for *_, t in items])

    ids = {id(g) for g in gates}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    optimise([(rest, 1.0), (gates, gate_lr_mult)], steps, lr, loss_at, "openflamingo",
             None if snapshot is None else lambda step: snapshot(step, model, tok))
    model.eval()
    B.save_openflamingo(model, tok, folder)
    return model, tok


# -------------------------------------------------------------------------------------------------- CLIP


def clip_class_embeddings(model, tok, templates=CLASS_TEMPLATES) -> torch.Tensor:
    """(C, D) normalised mean of the normalised template embeddings, per class."""
    texts = [t.format(c) for c in CLASSNAMES for t in templates]
    emb = F.normalize(model.get_text_features(**tok(texts, padding=True, return_tensors="pt")), dim=-1)
    return F.normalize(emb.view(len(CLASSNAMES), len(templates), -1).mean(1), dim=-1)


def train_clip(train: dict[str, Any], texts: list[str], steps: int, batch: int, lr: float, seed: int, workdir: Path):
    tok = B.clip_tokenizer(texts, 400, workdir)
    model, proc = B.build_clip(tok)
    pix = to_pixels(train["images"], B.CLIP_RES)
    rng = np.random.default_rng(seed + 2)
    n = len(pix)
    model.train()

    def loss_at(step: int) -> torch.Tensor:
        idx = rng.choice(n, size=min(batch, n), replace=False)
        caps = [train["captions"][i][int(rng.integers(5))] for i in idx]
        img = F.normalize(model.get_image_features(pixel_values=B.normalize(pix[idx])), dim=-1)
        txt = F.normalize(model.get_text_features(**tok(caps, padding=True, return_tensors="pt")), dim=-1)
        scale = model.logit_scale.exp().clamp(max=100)
        logits = scale * img @ txt.T
        target = torch.arange(len(idx))
        contrastive = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        zero_shot = F.cross_entropy(scale * img @ clip_class_embeddings(model, tok).T, train["labels"][idx])
        return contrastive + zero_shot

    optimise([(list(model.parameters()), 1.0)], steps, lr, loss_at, "clip")
    return model.eval(), proc


# -------------------------------------------------------------------------------------------------- main


def save_hf(model, proc, folder: Path) -> None:
    """transformers layout: config + model.safetensors + the processor's files, then the manifest."""
    model.save_pretrained(folder, safe_serialization=True)
    proc.save_pretrained(folder)
    write_manifest(folder)


def snapshotter(out: Path, kind: str, steps: set[int], of_folder: Path | None = None):
    """Saves the model being trained at ``steps`` into ``out/snapshots/<kind>_<step>/`` (the published layout,
    so the harness evaluates a snapshot like the final model: ``vlm.path=...``); weights and RNG are untouched."""
    import shutil

    def save(step: int, model, proc) -> None:
        if step not in steps:
            return
        dst, training = out / "snapshots" / f"{kind}_{step}", model.training
        grads = [(p, p.requires_grad) for p in model.parameters()]  # the package's saver resets these
        model.eval()
        if kind == "llava":
            save_hf(model, proc, dst)
        else:
            shutil.copytree(of_folder, dst, dirs_exist_ok=True, ignore=shutil.ignore_patterns("SHA256SUMS"))
            B.save_openflamingo(model, proc, dst)
            write_manifest(dst)
        model.train(training)
        for p, flag in grads:
            p.requires_grad_(flag)
        log.info("%s: snapshot at step %d in %s", kind, step, dst)

    return save


def write_manifest(folder: Path) -> None:
    """``SHA256SUMS`` (sha256sum format) of every file under ``folder``, checked at load."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "SHA256SUMS")
    lines = [f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.relative_to(folder).as_posix()}" for p in files]
    (folder / "SHA256SUMS").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="shapes world folder (generated there if missing)")
    ap.add_argument("--out", required=True, help="writes tiny_llava/, tiny_openflamingo/, tiny_clip_hf/ here")
    ap.add_argument("--models", default="clip,llava,openflamingo", help="comma-separated subset")
    ap.add_argument("--n-train", type=int, default=4000)
    ap.add_argument("--n-test", type=int, default=500)
    ap.add_argument("--extra-train", type=int, default=0,
                    help="more training scenes from the same generator with world seed 1 (written to <data>_extra; "
                         "the evaluated world, seed 0, and its test split are unchanged)")
    ap.add_argument("--llava-steps", type=int, default=900)
    ap.add_argument("--of-steps", type=int, default=650)
    ap.add_argument("--clip-steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=32, help="LLaVA batch (half captions, half VQA)")
    ap.add_argument("--of-batch", type=int, default=12, help="OpenFlamingo batch (half captions, half VQA)")
    ap.add_argument("--clip-batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--vocab", type=int, default=500, help="BPE vocabulary of the LLaVA/OpenFlamingo tokenizer")
    ap.add_argument("--vision-init", default=None,
                    help="tiny CLIP folder whose vision tower starts the LLaVA and OpenFlamingo towers "
                         "(default: <out>/tiny_clip_hf, trained first when --models has clip); 'none': from scratch")
    ap.add_argument("--freeze-vision-steps", type=int, default=150, help="LLaVA: tower frozen for these first steps")
    ap.add_argument("--projector-lr-mult", type=float, default=1.0, help="LLaVA projector learning-rate multiplier")
    ap.add_argument("--gate-init", type=float, default=1.0, help="OpenFlamingo cross-attention gates' start (package: 0)")
    ap.add_argument("--gate-lr-mult", type=float, default=1.0, help="OpenFlamingo gates' learning-rate multiplier")
    ap.add_argument("--latent-std", type=float, default=1.0, help="OpenFlamingo perceiver latents' initial std (package: 1)")
    ap.add_argument("--of-start-from", default=None,
                    help="a saved tiny_openflamingo folder to continue training from (a second stage, e.g. at a lower lr)")
    ap.add_argument("--snapshot-steps", default="", help="comma-separated steps at which LLaVA and OpenFlamingo are "
                    "also saved, under <out>/snapshots/ (learning curves); the final models are unchanged")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    wanted = set(args.models.split(","))
    try:
        snaps = {int(v) for v in args.snapshot_steps.split(",") if v.strip()}
    except ValueError:
        raise ConfigError(f"--snapshot-steps must be comma-separated integers, got {args.snapshot_steps!r}") from None
    if not wanted <= {"clip", "llava", "openflamingo"}:
        raise ConfigError(f"--models must be a subset of clip,llava,openflamingo, got {args.models!r}")
    init = None if args.vision_init == "none" else Path(args.vision_init or Path(args.out) / "tiny_clip_hf")
    if init is not None and wanted & {"llava", "openflamingo"} and "clip" not in wanted \
            and not (init / "model.safetensors").is_file():
        raise ConfigError(f"--vision-init: {init} has no model.safetensors (train the CLIP first, or pass 'none')")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    generate_shapes(args.data, n_train=args.n_train, n_test=args.n_test, seed=0)
    train = load_split(Path(args.data), "train")
    if args.extra_train > 0:
        extra = Path(f"{Path(args.data)}_extra")
        generate_shapes(extra, n_train=args.extra_train, n_test=0, seed=1)
        train = merge_splits(train, load_split(extra, "train"))
    texts = corpus(train)
    bpe = B.train_bpe(texts, args.vocab)
    seconds: dict[str, float] = {}
    if "clip" in wanted:
        torch.manual_seed(args.seed)  # each model starts from the same RNG state, alone or with the others
        t0 = time.perf_counter()
        model, proc = train_clip(train, texts, args.clip_steps, args.clip_batch, args.lr, args.seed, out / "tiny_clip_hf")
        save_hf(model, proc, out / "tiny_clip_hf")
        seconds["clip"] = time.perf_counter() - t0
    if "llava" in wanted:
        torch.manual_seed(args.seed)
        t0 = time.perf_counter()
        model, proc = train_llava(train, bpe, args.llava_steps, args.batch, args.lr, args.seed, init,
                                  args.freeze_vision_steps, args.projector_lr_mult,
                                  snapshotter(out, "llava", snaps) if snaps else None)
        save_hf(model, proc, out / "tiny_llava")
        seconds["llava"] = time.perf_counter() - t0
    if "openflamingo" in wanted:
        torch.manual_seed(args.seed)
        t0 = time.perf_counter()
        train_openflamingo(train, bpe, out / "tiny_openflamingo", args.of_steps, args.of_batch, args.lr, args.seed,
                           init, args.gate_init, args.gate_lr_mult,
                           snapshotter(out, "openflamingo", snaps, out / "tiny_openflamingo") if snaps else None,
                           args.latent_std, Path(args.of_start_from) if args.of_start_from else None)
        write_manifest(out / "tiny_openflamingo")
        seconds["openflamingo"] = time.perf_counter() - t0
    record = {"command": "python scripts/train_tiny_vlms.py " + shlex.join(sys.argv[1:] if argv is None else argv),
              "seconds": seconds, "threads": args.threads}
    (out / "tiny_vlms_training.json").write_text(json.dumps(record, indent=2) + "\n")
    log.info("done: %s", json.dumps(record))
    return seconds


if __name__ == "__main__":
    cli(main)
