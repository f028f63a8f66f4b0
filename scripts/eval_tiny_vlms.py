"""Measure the trained tiny LLaVA, OpenFlamingo and CLIP on the shapes world's test split, loaded from their
saved folders through the published loading paths (sha256 manifests checked first):

* clean quality: CIDEr (captioning), VQA accuracy, zero-shot top-1, next to the trivial baselines;
* APGD at eps 4/255, 100 steps, on the first ``--n-attack`` test images (per task), clean vs attacked;
* DiffCAP's premise with each model's own vision encoder as phi (pooled CLS, L2-normalised): the
  consecutive one-step similarity along DiffCAP's forward walk for clean and attacked images, and the
  clean/attacked pair similarity (plot + json under results/calibration/).

    python scripts/eval_tiny_vlms.py --data data/shapes --ckpt checkpoints
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import tiny_vlm_builders as B  # noqa: E402
import torch
import torch.nn.functional as F
import train_tiny_vlms as T  # noqa: E402
from calibrate_tau import first_pass  # noqa: E402

from attacks.apgd import APGD  # noqa: E402
from attacks.base import check_invariants  # noqa: E402
from diffcap.denoisers import load_shapes_denoiser  # noqa: E402
from diffcap.purifiers import DiffCAP  # noqa: E402
from evaluators.config import PROJECT_ROOT  # noqa: E402
from evaluators.datasets.shapes import CLASSNAMES  # noqa: E402
from evaluators.errors import ConfigError, DataError, IntegrityError, cli  # noqa: E402
from evaluators.metrics.cider import CiderScorer  # noqa: E402
from evaluators.metrics.vqa_accuracy import vqa_accuracy  # noqa: E402
from evaluators.seeding import generators  # noqa: E402

log = logging.getLogger("eval_tiny_vlms")
DENOISER_RES = 64


def verify_manifest(folder: Path) -> None:
    """Every file listed in SHA256SUMS must hash to its recorded value."""
    for line in (folder / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        if hashlib.sha256((folder / name).read_bytes()).hexdigest() != digest:
            raise IntegrityError(f"{folder / name} does not match its sha256 in {folder / 'SHA256SUMS'}")


def per_sample_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) mean cross-entropy over each sample's labelled (!= -100) next tokens."""
    lg, lb = logits[:, :-1].float(), labels[:, 1:]
    ce = F.cross_entropy(lg.transpose(1, 2), lb.clamp(min=0), reduction="none")
    mask = (lb != -100).float()
    return (ce * mask).sum(1) / mask.sum(1)


class Captioner:
    """One tiny generative model behind four calls: prompts, loss (B,), generation, phi."""

    def __init__(self, family: str, folder: Path):
        self.family = family
        if family == "llava":
            from transformers import LlavaForConditionalGeneration, LlavaProcessor

            self.model = LlavaForConditionalGeneration.from_pretrained(folder).eval()
            self.proc = LlavaProcessor.from_pretrained(folder)
            self.tok, self.res = self.proc.tokenizer, B.LLAVA_RES
        else:
            self.model, self.tok = B.load_openflamingo(folder)
            self.model.eval()
            self.res = B.OF_RES
        self.model.requires_grad_(False)

    def prompt(self, kind: str, question: str, demos: list[tuple[str, str]]) -> str:
        if self.family == "llava":
            user = T.CAPTION_USER if kind == "caption" else T.VQA_USER.format(question=question)
            return T.llava_prompt(self.proc, user)
        head = "".join(T.of_text(kind, q, a, image=False) for q, a in demos)
        return head + T.of_text(kind, question, None)

    def _batch(self, prompts: list[str], targets: list[str]) -> dict[str, torch.Tensor]:
        if self.family == "llava":
            prompts = [T.expand_image_tokens(self.proc, p) for p in prompts]
            targets = [" " + t + self.tok.eos_token for t in targets]
        else:
            targets = [t + "<|endofchunk|>" for t in targets]
        return T.masked_batch(self.tok, prompts, targets)

    def loss(self, x: torch.Tensor, prompts: list[str], targets: list[str]) -> torch.Tensor:
        batch = self._batch(prompts, targets)
        labels = batch.pop("labels")
        if self.family == "llava":
            logits = self.model(pixel_values=B.normalize(x), **batch).logits
        else:
            B.encode_vision_with_grad(self.model, B.normalize(x)[:, None, None])
            self.model._condition_media_locations(input_ids=batch["input_ids"])
            logits = self.model.lang_encoder(**batch).logits
            self.model.lang_encoder.clear_conditioned_layers()
        return per_sample_ce(logits, labels)

    @torch.no_grad()
    def generate(self, x: torch.Tensor, prompts: list[str], max_new_tokens: int) -> list[str]:
        self.tok.padding_side = "left"
        if self.family == "llava":
            enc = self.tok([T.expand_image_tokens(self.proc, p) for p in prompts], padding=True, return_tensors="pt")
            out = self.model.generate(pixel_values=B.normalize(x), **enc, max_new_tokens=max_new_tokens, do_sample=False)
            texts = self.tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            return [t.strip() for t in texts]
        enc = self.tok(prompts, padding=True, return_tensors="pt")
        out = self.model.generate(vision_x=B.normalize(x)[:, None, None], lang_x=enc["input_ids"],
                                  attention_mask=enc["attention_mask"], max_new_tokens=max_new_tokens, num_beams=1)
        texts = self.tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=False)
        return [t.split("<|endofchunk|>")[0].replace("<PAD>", "").replace("</s>", "").strip() for t in texts]

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """phi: the vision tower's pooled CLS (LLaVA: post-layernorm CLS; OpenFlamingo: open_clip's pooled
        projection), L2-normalised."""
        if self.family == "llava":
            pooled = self.model.vision_tower(B.normalize(x)).pooler_output
        else:
            pooled = self.model.vision_encoder(B.normalize(x))[0]
        return F.normalize(pooled.float(), dim=-1)


class ZeroShot:
    """The tiny CLIP: zero-shot logits and phi = the projected pooled CLS."""

    family = "clip"

    def __init__(self, folder: Path):
        from transformers import CLIPModel, CLIPProcessor

        self.model = CLIPModel.from_pretrained(folder).eval().requires_grad_(False)
        self.tok, self.res = CLIPProcessor.from_pretrained(folder).tokenizer, B.CLIP_RES
        with torch.no_grad():
            self.classes = T.clip_class_embeddings(self.model, self.tok)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        img = F.normalize(self.model.get_image_features(pixel_values=B.normalize(x)), dim=-1)
        return 100.0 * img @ self.classes.T

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.get_image_features(pixel_values=B.normalize(x)).float(), dim=-1)


# ---------------------------------------------------------------------------------------------- metrics


def demos_for(train: dict, kind: str, key: int, n: int = 2) -> list[tuple[str, str]]:
    """Text-only demonstrations from the train split, drawn with a per-sample seed."""
    rng = np.random.default_rng(key)
    if kind == "caption":
        return [("", train["captions"][int(i)][0]) for i in rng.choice(len(train["captions"]), n, replace=False)]
    return [(train["vqa"][int(i)]["question"], train["vqa"][int(i)]["answer"]) for i in rng.choice(len(train["vqa"]), n, replace=False)]


def caption_items(m: Captioner, train: dict, test: dict, rows: list[int]) -> list[str]:
    return [m.prompt("caption", "", demos_for(train, "caption", test["imgids"][r])) for r in rows]


def vqa_items(m: Captioner, train: dict, items: list[dict]) -> list[str]:
    return [m.prompt("vqa", v["question"], demos_for(train, "vqa", v["qid"])) for v in items]


def cider(test: dict, rows: list[int], caps: list[str]) -> float:
    refs = {str(test["imgids"][r]): test["captions"][r] for r in rows}
    return CiderScorer(refs).corpus({str(test["imgids"][r]): c for r, c in zip(rows, caps, strict=True)})


def vqa_score(items: list[dict], preds: list[str]) -> float:
    return 100.0 * float(np.mean([vqa_accuracy(p, v["answers"]) for p, v in zip(preds, items, strict=True)]))


def chunked(fn, n: int, size: int) -> list:
    return [y for i in range(0, n, size) for y in fn(slice(i, min(n, i + size)))]


def trivial(train: dict, test: dict) -> dict[str, float]:
    """Most common train caption for every image; most common train answer per question's first 3 words."""
    common = Counter(c for cs in train["captions"] for c in cs).most_common(1)[0][0]
    prior: dict[str, Counter] = {}
    for v in train["vqa"]:
        prior.setdefault(" ".join(v["question"].lower().split()[:3]), Counter())[v["answer"]] += 1
    preds = [prior.get(" ".join(v["question"].lower().split()[:3]), Counter({"yes": 1})).most_common(1)[0][0] for v in test["vqa"]]
    rows = list(range(len(test["imgids"])))
    return {"cider": cider(test, rows, [common] * len(rows)), "vqa": vqa_score(test["vqa"], preds),
            "top1": 100.0 / len(CLASSNAMES)}


def attack(loss_fn, x: torch.Tensor, steps: int) -> torch.Tensor:
    """APGD at 4/255 (no random start, step 2 eps); every image checked against its ball and box."""
    x_adv, _ = APGD(eps=4 / 255, steps=steps).perturb(lambda z, idx: loss_fn(z, idx), x)
    check_invariants(x_adv, x, 4 / 255)
    return x_adv


def premise(model, x: torch.Tensor, x_adv: torch.Tensor, moves: int) -> dict:
    """Consecutive one-step similarities along DiffCAP's forward walk (same noise for clean and attacked)."""
    seeds = list(range(len(x)))
    denoiser = load_shapes_denoiser(PROJECT_ROOT / "checkpoints" / "shapes_denoiser")  # DiffCAP's, 64 px
    assert denoiser.resolution == DENOISER_RES
    diffcap = DiffCAP(denoiser, encoder="clip", encoder_model=model, t_max=1.0)  # phi = the model's embed
    sims = {k: diffcap.walk(v, generators(seeds), until_stable=False, moves=moves).similarities.numpy()
            for k, v in (("clean", x), ("adv", x_adv))}
    pair = (model.embed(x) * model.embed(x_adv)).sum(-1).numpy()
    tau = float(pair.mean())
    return {"pair_similarity": {"mean": tau, "min": float(pair.min()), "max": float(pair.max())},
            "first_step_similarity": {k: {"mean": float(s[:, 0].mean()), "min": float(s[:, 0].min())} for k, s in sims.items()},
            "mean_curve": {k: s.mean(0).tolist() for k, s in sims.items()},
            "stopping_step_at_pair_tau": {k: float(first_pass(s, tau).mean()) for k, s in sims.items()}}


# ------------------------------------------------------------------------------------------------- main


def eval_captioner(m: Captioner, train: dict, test: dict, n_attack: int, steps: int, moves: int, bs: int) -> dict:
    rows = list(range(len(test["imgids"])))
    pix = T.to_pixels(test["images"], m.res)
    caps = chunked(lambda s: m.generate(pix[s], caption_items(m, train, test, rows[s]), 20), len(rows), bs)
    vqa = test["vqa"]
    preds = chunked(lambda s: m.generate(pix[[v["row"] for v in vqa[s]]], vqa_items(m, train, vqa[s]), 10), len(vqa), bs)
    out = {"cider": cider(test, rows, caps), "vqa": vqa_score(vqa, preds), "n_images": len(rows),
           "n_questions": len(vqa), "examples": dict(zip(map(str, test["imgids"][:5]), caps[:5], strict=True))}
    log.info("%s clean: CIDEr %.1f VQA %.1f", m.family, out["cider"], out["vqa"])
    # APGD 4/255 on the first n_attack images (captioning: the first reference; VQA: the majority answer)
    ar = rows[:n_attack]
    prompts, targets = caption_items(m, train, test, ar), [test["captions"][r][0] for r in ar]
    x = pix[ar]
    x_adv = attack(lambda z, idx: m.loss(z, [prompts[i] for i in idx], [targets[i] for i in idx]), x, steps)
    out["attack_caption"] = {"n": len(ar), "clean": cider(test, ar, caps[:n_attack]),
                             "apgd": cider(test, ar, m.generate(x_adv, prompts, 20))}
    items = vqa[:n_attack]
    vp, vt = vqa_items(m, train, items), [v["answer"] for v in items]
    xv = pix[[v["row"] for v in items]]
    xv_adv = attack(lambda z, idx: m.loss(z, [vp[i] for i in idx], [vt[i] for i in idx]), xv, steps)
    out["attack_vqa"] = {"n": len(items), "clean": vqa_score(items, preds[:n_attack]),
                         "apgd": vqa_score(items, m.generate(xv_adv, vp, 10))}
    log.info("%s APGD: %s %s", m.family, out["attack_caption"], out["attack_vqa"])
    out["premise"] = premise(m, x, x_adv, moves)
    return out


def eval_clip(m: ZeroShot, test: dict, n_attack: int, steps: int, moves: int, bs: int) -> dict:
    pix = T.to_pixels(test["images"], m.res)
    with torch.no_grad():
        pred = torch.cat([m.logits(pix[i : i + bs]).argmax(1) for i in range(0, len(pix), bs)])
    out = {"top1": 100.0 * float((pred == test["labels"]).float().mean()), "n_images": len(pix)}
    x, y = pix[:n_attack], test["labels"][:n_attack]
    x_adv = attack(lambda z, idx: F.cross_entropy(m.logits(z), y[idx], reduction="none"), x, steps)
    with torch.no_grad():
        out["attack"] = {"n": n_attack, "clean": 100.0 * float((m.logits(x).argmax(1) == y).float().mean()),
                         "apgd": 100.0 * float((m.logits(x_adv).argmax(1) == y).float().mean())}
    log.info("clip: top-1 %.1f, APGD %s", out["top1"], out["attack"])
    out["premise"] = premise(m, x, x_adv, moves)
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.5 * len(results), 3.6), squeeze=False)
    for ax, (name, r) in zip(axes[0], results.items(), strict=True):
        p = r["premise"]
        for k, curve in p["mean_curve"].items():
            ax.plot(np.arange(1, len(curve) + 1), curve, label=f"{k} inputs")
        ax.axhline(p["pair_similarity"]["mean"], color="k", ls="--", lw=1, label="clean/adv pair similarity")
        ax.set_title(f"tiny {name}: phi = own vision tower")
        ax.set_xlabel("forward move (1 DDPM step each)")
        ax.set_ylabel("cos(phi(x_k+1), phi(x_k))")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="the shapes world folder")
    ap.add_argument("--ckpt", required=True, help="folder holding tiny_llava/, tiny_openflamingo/, tiny_clip_hf/")
    ap.add_argument("--models", default="clip,llava,openflamingo")
    ap.add_argument("--n-attack", type=int, default=30)
    ap.add_argument("--attack-steps", type=int, default=100)
    ap.add_argument("--moves", type=int, default=50, help="forward moves traced for the premise")
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--limit", type=int, default=0, help="only the first N test images (0: all 500), for trials")
    ap.add_argument("--out", default="results/calibration/tiny_vlms", help="writes <out>.json and <out>.png")
    ap.add_argument("--merge", nargs="+", default=None,
                    help="instead of evaluating, merge these result json files (one model each) into <out>")
    args = ap.parse_args(argv)
    if args.merge:
        results = {}
        for f in args.merge:
            results.update(json.loads(Path(f).read_text()))
        return write_results(results, Path(args.out))
    names = {"clip": "tiny_clip_hf", "llava": "tiny_llava", "openflamingo": "tiny_openflamingo"}
    wanted = args.models.split(",")
    for w in wanted:
        if w not in names:
            raise ConfigError(f"--models must be a subset of {','.join(names)}, got {w!r}")
        if not (Path(args.ckpt) / names[w] / "SHA256SUMS").is_file():
            raise DataError(f"{Path(args.ckpt) / names[w]} has no SHA256SUMS; train it first (scripts/train_tiny_vlms.py)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    train, test = T.load_split(Path(args.data), "train"), T.load_split(Path(args.data), "test")
    if args.limit:
        test = {"images": test["images"][: args.limit], "imgids": test["imgids"][: args.limit],
                "labels": test["labels"][: args.limit], "captions": test["captions"][: args.limit],
                "vqa": [v for v in test["vqa"] if v["row"] < args.limit]}
    results: dict = {"trivial": trivial(train, test)}
    for w in wanted:
        folder = Path(args.ckpt) / names[w]
        verify_manifest(folder)
        if w == "clip":
            results[w] = eval_clip(ZeroShot(folder), test, args.n_attack, args.attack_steps, args.moves, args.batch)
        else:
            results[w] = eval_captioner(Captioner(w, folder), train, test, args.n_attack, args.attack_steps,
                                        args.moves, args.batch)
    return write_results(results, Path(args.out))


def write_results(results: dict, out: Path) -> dict:
    """<out>.json (everything), <out>.png (the premise curves) and a summary on stdout."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    plot({k: v for k, v in results.items() if k != "trivial"}, out.with_suffix(".png"))
    summary = {k: {kk: vv for kk, vv in v.items() if kk not in ("premise", "examples")} for k, v in results.items()}
    summary.update({k: {**summary[k], "premise": {kk: vv for kk, vv in v["premise"].items() if kk != "mean_curve"}}
                    for k, v in results.items() if k != "trivial"})
    print(json.dumps(summary, indent=2))
    return results


if __name__ == "__main__":
    cli(main)
