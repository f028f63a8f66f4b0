"""Train the small eps-prediction denoiser of the shapes world (DDPM objective, CPU).

Why: the real purifiers need guided-diffusion's 2.2 GB ImageNet model, which cannot be downloaded here.
The shapes world (evaluators/datasets/shapes.py) gets its own small denoiser, built with the SAME UNet
class and flags vocabulary (diffcap/unet.py), so DiffPure/DiffCAP run end to end on it.

Objective: linear betas 1e-4..0.02 over 1000 steps, index i uniform in 0..999 with
abar_i = prod_{j<=i} (1 - beta_j) (guided-diffusion's ``alphas_cumprod``), x_i = sqrt(abar_i) x_0 +
sqrt(1 - abar_i) eps, loss = mean (eps_hat - eps)^2; images mapped to [-1, 1], random horizontal flips;
EMA of the weights is what gets saved. Afterwards it draws a sample grid (the project's DDIM sampler, eta 0,
from pure noise) and a purification grid (test images noised to t = 0.15, i.e. 150 steps, then the project's
DDPM sampler back). All schedule arithmetic is ``diffcap.schedule.LINEAR``'s.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from diffcap.denoisers import Denoiser, load_shapes_denoiser, save_denoiser
from diffcap.samplers import DDIM, DDPMAncestral
from diffcap.schedule import LINEAR
from diffcap.unet import UNetModel
from evaluators.errors import cli

log = logging.getLogger("train_shapes_denoiser")
NUM_STEPS = LINEAR.num_steps


def load_images(root: str | Path, split: str) -> torch.Tensor:
    """uint8 (N, 3, H, W) images of one Karpathy split of a shapes world (``dataset_shapes.json``)."""
    root = Path(root)
    meta = json.loads((root / "dataset_shapes.json").read_text())
    entries = [e for e in meta["images"] if e["split"] == split]
    if not entries:
        raise ValueError(f"no '{split}' images listed in {root / 'dataset_shapes.json'}")
    arrs = [np.asarray(Image.open(root / e["filepath"] / e["filename"]).convert("RGB")) for e in entries]
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()


def to_model_range(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 127.5 - 1.0


def build_model(args: argparse.Namespace, image_size: int) -> UNetModel:
    return UNetModel(
        image_size=image_size,
        num_channels=args.channels,
        num_res_blocks=args.res_blocks,
        channel_mult=args.channel_mult,
        attention_resolutions=args.attention,
        learn_sigma=False,
        num_head_channels=args.head_channels,
        use_scale_shift_norm=True,
        resblock_updown=True,
        dropout=0.0,
    )


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up, then cosine decay to 10 % of the peak."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    frac = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def train(
    model: UNetModel, images: torch.Tensor, args: argparse.Namespace
) -> tuple[UNetModel, dict[str, float]]:
    """Run the DDPM eps objective; returns the EMA model and a few numbers for the README."""
    gen = torch.Generator().manual_seed(args.seed)
    abar = LINEAR.alphas_cumprod.float()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    model.train()
    t0 = time.perf_counter()
    recent: list[float] = []
    step = 0
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        idx = torch.randint(len(images), (args.batch_size,), generator=gen)
        x0 = to_model_range(images[idx])
        flip = torch.rand(args.batch_size, generator=gen) < 0.5
        x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        t = torch.randint(NUM_STEPS, (args.batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = abar[t][:, None, None, None]
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            pred = model(xt, t)
        loss = F.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
                pe.lerp_(pm, 1 - decay)
        recent = (recent + [loss.item()])[-200:]
        elapsed = time.perf_counter() - t0
        if step % args.log_every == 0 or step == args.steps - 1:
            log.info(
                "step %d loss %.4f (mean last %d: %.4f) %.0f s",
                step,
                loss.item(),
                len(recent),
                sum(recent) / len(recent),
                elapsed,
            )
        if args.max_minutes and elapsed > args.max_minutes * 60:
            log.warning("time budget of %.1f min reached at step %d", args.max_minutes, step)
            break
    stats = {
        "steps_done": step + 1,
        "train_seconds": time.perf_counter() - t0,
        "final_loss_mean_last_200": sum(recent) / max(1, len(recent)),
    }
    return ema, stats


@torch.no_grad()
def eval_loss(model: UNetModel, images: torch.Tensor, seed: int, n: int = 128) -> dict[str, float]:
    """EMA model's eps MSE on held-out images at a few fixed timestep indices (same noise every run)."""
    gen = torch.Generator().manual_seed(seed + 1)
    abar = LINEAR.alphas_cumprod.float()
    x0 = to_model_range(images[:n])
    out = {}
    for i in (50, 150, 300, 600, 900):
        noise = torch.randn(x0.shape, generator=gen)
        a = abar[i]
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        eps = torch.cat([model(c, torch.full((len(c),), i)) for c in xt.split(32)])
        out[f"test_mse_t{i}"] = F.mse_loss(eps, noise).item()
    return out


def _generators(n: int, seed: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed * 1000 + i) for i in range(n)]


@torch.no_grad()
def ddim_sample(model: UNetModel, n: int, size: int, steps: int, seed: int) -> torch.Tensor:
    """Deterministic DDIM (eta 0) from pure noise at t = 1 in ``steps`` steps."""
    x = torch.randn((n, 3, size, size), generator=torch.Generator().manual_seed(seed))
    out, _ = DDIM(steps=steps).sample(Denoiser(model), x, torch.ones(n, dtype=torch.float64), _generators(n, seed))
    return out.clamp(-1, 1)


@torch.no_grad()
def ddpm_purify(model: UNetModel, x0: torch.Tensor, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise x0 to x_k in closed form, then k DDPM ancestral steps back; returns (x_k, x_hat)."""
    gens = _generators(len(x0), seed)
    noise = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in gens])
    xk = LINEAR.q_sample(x0, LINEAR.alpha_bars[k], noise)
    t = torch.full((len(x0),), k / NUM_STEPS, dtype=torch.float64)
    x, _ = DDPMAncestral().sample(Denoiser(model), xk, t, gens)
    return xk.clamp(-1, 1), x.clamp(-1, 1)


def save_grid(rows: list[tuple[str, torch.Tensor]], path: Path, scale: int = 2) -> None:
    """One labelled row per (title, images in [-1, 1]) pair, drawn with PIL (no font cache needed)."""
    from PIL import ImageDraw

    ncols = max(len(r[1]) for r in rows)
    size = rows[0][1].shape[-1] * scale
    pad, label_h = 4, 14
    canvas = Image.new("RGB", (ncols * (size + pad) + pad, len(rows) * (size + label_h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (title, imgs) in enumerate(rows):
        y = pad + r * (size + label_h + pad)
        draw.text((pad, y), title, fill="black")
        for c, img in enumerate(imgs):
            arr = ((img.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
            tile = Image.fromarray(arr).resize((size, size), Image.NEAREST)
            canvas.paste(tile, (pad + c * (size + pad), y + label_h))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_readme(out: Path, history: list[dict], n_params: int, sha: str, data: Path) -> None:
    """README with every training stage (command, time, loss), so the checkpoint can be remade."""
    done = data / "DONE"
    params = done.read_text().strip() if done.is_file() else "unknown"
    lines = [
        "# Shapes-world denoiser",
        "",
        "Small eps-prediction UNet (diffcap/unet.py, guided-diffusion layout) for the 64 px shapes world.",
        'Load with `diffcap.denoisers.load_shapes_denoiser("checkpoints/shapes_denoiser")`.',
        "",
        f"- data: shapes world (generate_shapes / scripts/make_shapes.py, parameters {params}), train split",
        f"- parameters: {n_params:,}",
        "- objective: eps MSE, linear betas 1e-4..0.02 over 1000 steps, uniform timestep; EMA weights saved",
        "",
    ]
    for i, h in enumerate(history, 1):
        lines += [
            f"## Stage {i}" + (" (starts from the weights of the stage before: `--init`)" if i > 1 else ""),
            "",
            "```",
            "python scripts/train_shapes_denoiser.py " + h["command"],
            "```",
            "",
            f"- training steps: {h['steps_done']}, {h['train_minutes']:.1f} min on CPU (1 thread)",
            f"- final training loss (mean of the last 200 steps): {h['final_loss']:.4f}",
        ]
        lines += [f"- EMA weights, eps MSE {k} on 128 test images: {v:.4f}" for k, v in h["test"].items()]
        lines.append("")
    lines += [f"sha256 of model.safetensors: `{sha}`", ""]
    (out / "README.md").write_text("\n".join(lines))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="root of a shapes world (made if missing)")
    ap.add_argument("--out", default="checkpoints/shapes_denoiser", help="output folder")
    ap.add_argument("--samples-png", default="results/shapes_denoiser_samples.png")
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument(
        "--init",
        default=None,
        help="continue from this checkpoint folder (its model flags win over the flags below)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--channels", type=int, default=32)
    ap.add_argument("--channel-mult", default="1,2,2,2")
    ap.add_argument("--res-blocks", type=int, default=1)
    ap.add_argument("--attention", default="16,8", help="resolutions with self-attention")
    ap.add_argument("--head-channels", type=int, default=32)
    ap.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="bfloat16 autocast for the training forward (about 2x faster on CPUs with AVX512-BF16); "
        "weights, EMA and sampling stay float32",
    )
    ap.add_argument("--max-minutes", type=float, default=0.0, help="stop training after this long (0: never)")
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--n-samples", type=int, default=16)
    ap.add_argument("--sample-steps", type=int, default=100, help="DDIM steps for the sample grid")
    ap.add_argument("--purify-t", type=float, default=0.15, help="diffusion time of the purification grid")
    ap.add_argument("--n-purify", type=int, default=8)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, float]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data = Path(args.data)
    if not (data / "dataset_shapes.json").is_file():
        from evaluators.datasets.shapes import generate_shapes

        generate_shapes(data)
    train_imgs, test_imgs = load_images(data, "train"), load_images(data, "test")
    size = train_imgs.shape[-1]
    history: list[dict] = []
    if args.init:
        start = load_shapes_denoiser(args.init)
        model = start.unet.float().train().requires_grad_(True)
        history = (
            json.loads((Path(args.init) / "config.json").read_text()).get("extra", {}).get("history", [])
        )
        log.info("starting from %s (%d earlier stages)", args.init, len(history))
    else:
        model = build_model(args, size)
    n_params = sum(p.numel() for p in model.parameters())
    log.info(
        "%d train / %d test images at %d px; model %d parameters",
        len(train_imgs),
        len(test_imgs),
        size,
        n_params,
    )

    ema, stats = train(model, train_imgs, args)
    stats.update(eval_loss(ema, test_imgs, args.seed))
    out = Path(args.out)
    history.append(
        {
            "command": shlex.join(argv),
            "steps_done": int(stats["steps_done"]),
            "train_minutes": round(stats["train_seconds"] / 60, 2),
            "final_loss": round(stats["final_loss_mean_last_200"], 5),
            "test": {k: round(v, 5) for k, v in stats.items() if k.startswith("test_")},
        }
    )
    weights = save_denoiser(Denoiser(ema), out, extra={"trained_on": "shapes", "history": history})
    sha = sha256_file(weights)
    write_readme(out, history, n_params, sha, data)

    t_s = time.perf_counter()
    samples = ddim_sample(ema, args.n_samples, size, args.sample_steps, args.seed + 2)
    half = (len(samples) + 1) // 2
    k = max(1, round(args.purify_t * NUM_STEPS))
    clean = to_model_range(test_imgs[: args.n_purify])
    noised, purified = ddpm_purify(ema, clean, k, args.seed + 3)
    save_grid(
        [
            (f"DDIM-{args.sample_steps} samples from noise", samples[:half]),
            ("(samples, continued)", samples[half:]),
            ("test images", clean),
            (f"noised to t={args.purify_t:g} ({k} steps)", noised),
            ("purified (DDPM back to 0)", purified),
        ],
        Path(args.samples_png),
    )
    stats["purify_mse"] = F.mse_loss(purified, clean).item()
    stats["sampling_seconds"] = time.perf_counter() - t_s
    log.info("stats %s", json.dumps(stats))
    print(f"saved {weights} (sha256 {sha}) and {args.samples_png}")
    return stats


if __name__ == "__main__":
    cli(main)
