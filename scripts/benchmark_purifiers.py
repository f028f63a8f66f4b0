"""Denoising runtime of DiffCAP against DiffPure on the same images in one process, and DiffCAP batched
against one image at a time. Ratios are what to read: this machine's absolute seconds are noisy.

    python scripts/benchmark_purifiers.py                       # shapes world, grey-box APGD images
    python scripts/benchmark_purifiers.py n_samples=64 attack.eps=2 --repeats 3

Arguments of the form key=value are Hydra overrides of configs/run.yaml (the same as run.py takes). The
VLM, task, DiffCAP and attack are built by the runner's own ``build``, DiffPure by its ``build_defense``; the
adversarial images come from the harness's attack (and its cache, so a finished grey-box run makes them free).
Writes results/benchmarks/purifiers_<dataset>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from evaluators.config import PROJECT_ROOT, compose_config, validate
from evaluators.errors import cli
from evaluators.runner import build, build_defense, clean_and_adversarial
from evaluators.seeding import derive_seed, generators

log = logging.getLogger("benchmark_purifiers")


def timed_purify(purifier, x: torch.Tensor, seeds: list[int], batch: int) -> dict:
    tic = time.perf_counter()
    infos = []
    with torch.no_grad():
        for i in range(0, x.shape[0], batch):
            _, inf = purifier.purify(x[i : i + batch], generators(seeds[i : i + batch]))
            infos.extend(inf)
    seconds = time.perf_counter() - tic
    return {
        "seconds_per_image": seconds / x.shape[0],
        "t_mean": float(np.mean([i.t for i in infos])),
        "t_median": float(np.median([i.t for i in infos])),
        "denoiser_evals_mean": float(np.mean([i.denoiser_evals for i in infos])),
        "encoder_evals_mean": float(np.mean([i.encoder_evals for i in infos])),
        "converged_fraction": float(np.mean([i.converged for i in infos])),
        "t": [i.t for i in infos],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repetitions (median is reported)")
    parser.add_argument("--task", default="captioning")
    parser.add_argument("--out", type=Path, default=None)
    args, overrides = parser.parse_known_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = ["attack=apgd", "n_samples=32", f"tasks=[{args.task}]", *overrides]
    cfg = compose_config([*overrides, "defense=diffcap"])
    validate(cfg)
    diffpure_cfg = compose_config([*overrides, "defense=diffpure"])
    validate(diffpure_cfg)
    h = build(cfg, Path(cfg.paths.output_dir))
    samples, x, x_adv = clean_and_adversarial(h, args.task)
    diffpure = build_defense(diffpure_cfg, h.vlm, torch.device(cfg.device))
    bs = int(cfg.batch_size)
    purifiers = {"diffpure": diffpure, "diffcap": h.defense}
    seeds = [derive_seed(cfg.seed.noise, "benchmark", s["id"]) for s in samples]
    runs: dict[str, list[dict]] = {}
    for r in range(args.repeats):
        order = ["diffpure", "diffcap"] if r % 2 == 0 else ["diffcap", "diffpure"]
        for name in order:
            for cond, images_ in (("clean", x), ("adv", x_adv)):
                runs.setdefault(f"{name}/{cond}", []).append(timed_purify(purifiers[name], images_, seeds, bs))
        runs.setdefault("diffcap/adv/one_at_a_time", []).append(
            timed_purify(purifiers["diffcap"], x_adv, seeds, 1))

    def med(key: str, field: str) -> float:
        return float(np.median([run[field] for run in runs[key]]))

    table = {k: {f: med(k, f) for f in ("seconds_per_image", "t_mean", "t_median", "denoiser_evals_mean",
                                          "encoder_evals_mean", "converged_fraction")} for k in runs}
    ratios = {
        f"diffcap/diffpure seconds ({cond})": table[f"diffcap/{cond}"]["seconds_per_image"]
        / table[f"diffpure/{cond}"]["seconds_per_image"] for cond in ("clean", "adv")
    }
    ratios["diffcap batched/one-at-a-time seconds (adv)"] = (
        table["diffcap/adv"]["seconds_per_image"] / table["diffcap/adv/one_at_a_time"]["seconds_per_image"])
    result = {
        "what": "denoising runtime per image, same images, same process, interleaved repeats (median)",
        "overrides": overrides, "task": args.task, "n_images": len(samples), "batch_size": bs,
        "repeats": args.repeats, "torch_threads": torch.get_num_threads(), "device": str(x.device),
        "denoiser": cfg.denoiser._target_, "table": table, "ratios": ratios,
        "stopping_times": {k: runs[k][0]["t"] for k in runs},
    }
    out = args.out or PROJECT_ROOT / "results" / "benchmarks" / f"purifiers_{cfg.dataset.name}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    lines = ["| purifier / input | s per image | t mean | t median | denoiser evals | encoder evals | converged |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for k, v in table.items():
        lines.append(f"| {k} | {v['seconds_per_image']:.4f} | {v['t_mean']:.4f} | {v['t_median']:.4f} | "
                     f"{v['denoiser_evals_mean']:.1f} | {v['encoder_evals_mean']:.1f} | {v['converged_fraction']:.2f} |")
    lines += ["", *(f"- {k}: **{v:.4g}**" for k, v in ratios.items())]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    cli(main)
