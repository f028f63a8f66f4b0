"""Predict the device time of a run (or of an experiment's whole sweep) before booking a GPU, from the unit costs in
results/bench/unit_costs.json and the evaluation counts of the run (evaluators/cost.py).

    python scripts/estimate_cost.py experiment=paper/captioning --sweep --diffcap-t 0.05   # a paper table
    python scripts/estimate_cost.py experiment=embedded/runtime --sweep --counts results/multiruns/embedded/runtime
    python scripts/estimate_cost.py --check results/runs/<run folder>      # predicted against recorded
    python scripts/estimate_cost.py --measure guided_diffusion_256 --precision float16 --device cuda --batch 8
    python scripts/estimate_cost.py --mark-missing                          # list the GPU units still unmeasured

Counts: ``--counts FOLDER`` takes them from finished runs (a run folder, or a sweep folder searched for runs
with the same defense), else from the config (APGD runs at their upper bound, DiffCAP at ``--diffcap-t``). A unit
with no measurement is named, with its count, and left out of the sum. ``--measure ARCH`` times one evaluation
of a real-size architecture with random weights (guided_diffusion_256, clip, llava) and records it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from omegaconf import OmegaConf

from diffcap import perf
from evaluators import cost, results
from evaluators.config import CONFIG_DIR, PROJECT_ROOT, compose_config, select_tasks, vlm_tasks
from evaluators.errors import ConfigError, DataError, cli

UNITS = PROJECT_ROOT / "results" / "bench" / cost.UNIT_FILE
#: the units a paper table needs on a GPU: (arch, kind, precision) with the configs' default precisions
GPU_UNITS = [("guided_diffusion_256", "denoiser_eval", "float16"), ("clip", "encoder_eval", "float32"),
             ("clip", "vlm_fwd_bwd", "float32"), ("clip", "vlm_predict", "float32")] + [
    (vlm, kind, "float16") for vlm in ("llava", "openflamingo")
    for kind in ("encoder_eval", "vlm_fwd_bwd", "vlm_predict")]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# --------------------------------------------------------------------------------------------- prediction


def find_runs(folder: Path) -> list[Path]:
    return sorted(p.parent for p in folder.rglob(results.SUMMARY)) if folder.is_dir() else []


def recorded_counts(folder: Path, cfg) -> dict[str, cost.Counts]:
    """Counts of the finished run in ``folder`` whose defense and VLM match ``cfg`` (the first one found)."""
    for run in find_runs(folder):
        summary = json.loads((run / results.SUMMARY).read_text())
        rc = summary.get("config", {})
        if rc.get("defense", {}).get("name") == cfg.defense.name and rc.get("vlm", {}).get("name") == cfg.vlm.name:
            steps = int(rc.get("attack", {}).get("steps") or 0)
            return cost.counts_from_records(results.read_records(run / results.SAMPLES), steps)
    raise DataError(f"no finished run of vlm={cfg.vlm.name} defense={cfg.defense.name} under {folder}")


def jobs_of(overrides: list[str], sweep: bool) -> list[list[str]]:
    if not sweep:
        return [overrides]
    names = [o.split("=", 1)[1] for o in overrides if o.startswith("experiment=")]
    if not names:
        raise ConfigError("--sweep needs experiment=<name>, whose hydra.sweeper.params list the jobs")
    path = CONFIG_DIR / "experiment" / f"{names[-1]}.yaml"
    if not path.is_file():
        raise ConfigError(f"experiment={names[-1]} does not exist (no {path})")
    return [[*overrides, *job] for job in cost.sweep_overrides(path)]


def predict_jobs(args, overrides: list[str], units: list[cost.Unit]) -> dict:
    rows, missing, total, evals = [], {}, 0.0, {}
    for job in jobs_of(overrides, args.sweep):
        cfg = compose_config(job, check=False)  # a GPU config is predicted on any machine
        device = str(args.device or cfg.device).split(":")[0]
        archs = cost.architectures(cfg)
        tasks = select_tasks(cfg, vlm_tasks(cfg))
        recorded = recorded_counts(args.counts, cfg) if args.counts else None
        for task in tasks:
            counts = recorded[task] if recorded else cost.counts_from_config(cfg, task, args.diffcap_t)
            n = int(cfg.n_samples) if cfg.n_samples is not None else None
            if n is None:
                raise ConfigError("n_samples=null: the cost model needs a number of samples")
            p = cost.predict(counts, n, archs, units, device, int(cfg.batch_size))
            total += p.seconds
            for kind, per_image in counts.as_dict().items():
                if per_image:
                    unit = " ".join((kind, *archs.get(kind, ("?", "?")), device))
                    evals[unit] = evals.get(unit, 0.0) + per_image * n
            for m in p.missing:
                missing.setdefault(m.split(":")[0], m)
            rows.append({"job": " ".join(o for o in job if o not in overrides) or " ".join(job), "task": task, "images": n, "device": device,
                         "counts": counts.as_dict(), "notes": counts.notes, "seconds_known": p.seconds,
                         "terms": p.terms, "missing": p.missing})
    return {"rows": rows, "seconds_known": total, "missing": sorted(missing.values()), "complete": not missing,
            "evaluations": evals}


def check_run(folder: Path, units: list[cost.Unit]) -> dict:
    """Predicted against recorded seconds of a finished run (units of the run's own device)."""
    path = folder / results.SUMMARY
    if not path.is_file():
        raise DataError(f"{folder} holds no finished run ({results.SUMMARY} missing)")
    summary = json.loads(path.read_text())
    cfg = OmegaConf.create(summary["config"])
    device = str(cfg.device).split(":")[0]
    counts = cost.counts_from_records(results.read_records(folder / results.SAMPLES), int(cfg.attack.get("steps") or 0))
    out = []
    for task, c in counts.items():
        n = summary["samples"][task]["evaluated"]
        p = cost.predict(c, n, cost.architectures(cfg), units, device, int(cfg.batch_size))
        stages = summary["timing_seconds"].get(task, {})
        recorded = sum(v for k, v in stages.items() if k != "load")
        den = sum(p.terms.get(k, {}).get("seconds", 0.0) for k in ("denoiser_eval", "encoder_eval"))
        out.append({"task": task, "images": n, "predicted": p.seconds, "recorded": recorded,
                    "predicted_over_recorded": perf.ratio(p.seconds, recorded), "missing": p.missing,
                    "terms": p.terms,
                    "defense_predicted": den, "defense_recorded": stages.get("defense", 0.0),
                    "attack_recorded": stages.get("attack", 0.0), "predict_recorded": stages.get("predict", 0.0)})
    return {"run": str(folder), "rows": out}


# --------------------------------------------------------------------------------------------- measuring


def gd256_calls(precision: str, device: torch.device, flags: dict | None = None):
    """guided-diffusion's 256x256 UNet with random weights: float16 = its own fp16 torso, bfloat16 = autocast."""
    from diffcap.denoisers import build_denoiser
    from diffcap.unet import GUIDED_DIFFUSION_256_UNCOND_FLAGS

    den = build_denoiser({"unet": flags or dict(GUIDED_DIFFUSION_256_UNCOND_FLAGS)}).to(device).eval()
    den.requires_grad_(False)
    if precision == "float16":
        den.unet.set_torso_dtype(torch.float16)
    elif precision == "bfloat16":
        den.set_speed(autocast="bfloat16")
    r = den.resolution

    def call(b: int):
        x, t = torch.randn(b, 3, r, r, device=device), torch.full((b,), 0.1, device=device)
        return lambda: _no_grad(den, x, t)
    return {"denoiser_eval": call}


def clip_calls(precision: str, device: torch.device, config=None, classes: int = 1000):
    """CLIP (ViT-B/32 by default) with random weights: embedding, zero-shot logits, and their CE gradient."""
    from model_sizes import clip_vit_b32_config
    from transformers import CLIPModel

    model = CLIPModel(config or clip_vit_b32_config()).to(device=device, dtype=DTYPES[precision]).eval()
    model.requires_grad_(False)
    r = model.config.vision_config.image_size
    text = torch.nn.functional.normalize(torch.randn(classes, model.config.projection_dim, device=device), dim=-1)

    def logits(x):
        return 100 * torch.nn.functional.normalize(model.get_image_features(pixel_values=x).float(), dim=-1) @ text.T

    def fwd_bwd(x):
        x = x.clone().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(logits(x), torch.zeros(x.shape[0], dtype=torch.long, device=device))
        torch.autograd.grad(loss, x)

    def make(fn, grad=False):
        def call(b: int):
            x = torch.rand(b, 3, r, r, device=device, dtype=DTYPES[precision])
            return (lambda: fn(x)) if grad else (lambda: _no_grad(fn, x))
        return call
    return {"encoder_eval": make(lambda x: model.get_image_features(pixel_values=x)),
            "vlm_predict": make(logits), "vlm_fwd_bwd": make(fwd_bwd, grad=True)}


def llava_calls(precision: str, device: torch.device, config=None, prompt: int = 24, target: int = 12,
                new_tokens: int = 20):
    """LLaVA (1.5-7B by default) with random weights: pooled vision embedding, the target cross-entropy's
    gradient w.r.t. the pixels, and greedy generation of ``new_tokens`` tokens."""
    from model_sizes import llava_15_7b_config
    from transformers import LlavaForConditionalGeneration

    cfg = config or llava_15_7b_config()
    with torch.device(device):
        model = LlavaForConditionalGeneration(cfg).to(DTYPES[precision]).eval()
    model.requires_grad_(False)
    vc = cfg.vision_config
    n_img = (vc.image_size // vc.patch_size) ** 2

    def ids(b: int, n_text: int) -> torch.Tensor:
        text = torch.randint(3, cfg.text_config.vocab_size - 1, (b, n_text), device=device)
        image = torch.full((b, n_img), cfg.image_token_index, device=device)
        return torch.cat([text[:, :1], image, text[:, 1:]], dim=1)

    def call(kind: str):
        def make(b: int):
            pv = torch.randn(b, 3, vc.image_size, vc.image_size, device=device, dtype=DTYPES[precision])
            if kind == "encoder_eval":
                return lambda: _no_grad(lambda: model.model.vision_tower(pv).pooler_output)
            if kind == "vlm_predict":
                i = ids(b, prompt)
                return lambda: _no_grad(lambda: model.generate(input_ids=i, pixel_values=pv, do_sample=False,
                                                               max_new_tokens=new_tokens, min_new_tokens=new_tokens))
            i = ids(b, prompt + target)

            def fwd_bwd():
                p = pv.clone().requires_grad_(True)
                logits = model(input_ids=i, pixel_values=p, use_cache=False).logits[:, -target - 1:-1].float()
                loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), i[:, -target:])
                torch.autograd.grad(loss, p)
            return fwd_bwd
        return make
    return {k: call(k) for k in ("encoder_eval", "vlm_fwd_bwd", "vlm_predict")}


BUILDERS = {"guided_diffusion_256": gd256_calls, "clip": clip_calls, "llava": llava_calls}


@torch.no_grad()
def _no_grad(fn, *a):
    return fn(*a)


def measure(arch: str, precision: str, device: torch.device, batch: int, repeats: int) -> list[cost.Unit]:
    calls = BUILDERS[arch](precision, device)
    mach = cost.machine()
    out = []
    for kind, make in calls.items():
        with perf.peak_memory(device) as mem:
            sec = perf.median_seconds(make(batch), repeats, warmup=1, device=device)
        out.append(cost.Unit(arch, kind, precision, device.type, batch, sec / batch, machine={**mach, "memory": mem},
                             source=f"scripts/estimate_cost.py --measure {arch} --precision {precision} "
                                    f"--device {device} --batch {batch} (random weights)"))
    return out


# --------------------------------------------------------------------------------------------- CLI


def show(res: dict) -> str:
    if "run" in res:
        lines = [f"run {res['run']}", "| task | images | predicted (s) | recorded (s) | predicted / recorded | "
                 "defense predicted / recorded (s) |", "|" + " --- |" * 6]
        lines += [f"| {r['task']} | {r['images']} | {r['predicted']:.1f} | {r['recorded']:.1f} | "
                  f"{r['predicted_over_recorded']:.2f} | {r['defense_predicted']:.1f} / {r['defense_recorded']:.1f} |"
                  for r in res["rows"]]
        return "\n".join(lines + [f"missing: {m}" for r in res["rows"] for m in r["missing"]])
    lines = ["| job | task | images | denoiser / encoder / fwd+bwd / predict evals per image | known (h) |",
             "|" + " --- |" * 5]
    for r in res["rows"]:
        c = r["counts"]
        lines.append(f"| {r['job']} | {r['task']} | {r['images']} | {c['denoiser_eval']:.1f} / {c['encoder_eval']:.1f}"
                     f" / {c['vlm_fwd_bwd']:.0f} / {c['vlm_predict']:.0f} | {r['seconds_known'] / 3600:.2f} |")
    lines += ["", "| unit (kind, arch, precision, device) | evaluations (images x per image, all jobs) |",
              "| --- | ---: |"] + [f"| {k} | {v:,.0f} |" for k, v in sorted(res["evaluations"].items())]
    lines.append(f"\nknown part: {res['seconds_known'] / 3600:.2f} h; "
                 + ("complete" if res["complete"] else "INCOMPLETE, missing unit costs:"))
    return "\n".join(lines + [f"  - {m}" for m in res["missing"]])


def main() -> None:
    p = cost.OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweep", action="store_true", help="every job of the experiment's sweep")
    p.add_argument("--counts", type=Path, help="take the counts from finished runs under this folder")
    p.add_argument("--diffcap-t", type=float, help="assumed mean stopping time of DiffCAP (no --counts)")
    p.add_argument("--device", help="predict for this device kind (default: the config's)")
    p.add_argument("--units", type=Path, default=UNITS)
    p.add_argument("--check", type=Path, help="a finished run: predicted against recorded seconds")
    p.add_argument("--measure", choices=sorted(BUILDERS), help="measure a real-size architecture's unit costs")
    p.add_argument("--precision", default="float32", choices=sorted(DTYPES))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--mark-missing", action="store_true", help="record the GPU units not measured yet")
    p.add_argument("--json", type=Path, help="also write the result here")
    args, overrides = p.parse_known_args()
    cost.check_overrides(overrides)
    if args.diffcap_t is not None and not 0 <= args.diffcap_t <= 1:
        raise ConfigError(f"--diffcap-t={args.diffcap_t} is not accepted: a diffusion time in [0, 1]")
    if args.batch < 1 or args.repeats < 1:
        raise ConfigError("--batch and --repeats must be >= 1")
    units = cost.read_units(args.units)
    if args.measure:
        device = torch.device(args.device or "cpu")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda: no GPU on this machine")
        res = {"units": [u.__dict__ for u in cost.write_units(args.units, measure(
            args.measure, args.precision, device, args.batch, args.repeats)) if u.arch == args.measure]}
        text = json.dumps(res, indent=1)
    elif args.mark_missing:
        have = {u.key for u in units if u.seconds_per_image is not None}
        new = [cost.Unit(a, k, pr, "cuda", 8, missing="no GPU lent so far: measure with scripts/estimate_cost.py "
                         "--measure on a GPU machine" if a != "openflamingo" else
                         "no GPU lent so far, and no random-weight builder (open_flamingo builds from hub weights)")
               for a, k, pr in GPU_UNITS if (a, k, pr, "cuda") not in have]
        cost.write_units(args.units, new)
        res, text = {"missing": [u.key for u in new]}, "\n".join(" ".join(u.key) for u in new)
    elif args.check:
        res = check_run(args.check, units)
        text = show(res)
    else:
        res = predict_jobs(args, overrides, units)
        text = show(res)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        results.write_text_atomic(args.json, json.dumps(res, indent=1, default=str) + "\n")
    print(text)


if __name__ == "__main__":
    cli(main)
