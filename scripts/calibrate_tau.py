"""Calibrate DiffCAP's tau on clean/adversarial pairs of a data set (the paper's "Algorithm 2").

For ~100 pairs (x, x_adv) it reports
  * the suggested tau: the mean cosine similarity cos(phi(x), phi(x_adv)) of the pairs' embeddings, i.e. how
    close an adversarial image's embedding stays to its clean one (our reading of the paper's rule; DiffCAP
    stops once one diffusion step changes the embedding less than that);
  * the mean consecutive-step similarity curves cos(phi(x_{k+1}), phi(x_k)) of the cumulative forward walk
    from clean and from adversarial images (same noise), and the stopping-time distribution each tau gives.

    python scripts/calibrate_tau.py dataset=shapes vlm=tiny_llava n_samples=100

Arguments key=value are Hydra overrides of configs/run.yaml. Everything is built by the runner's own
``build`` (with ``defense=diffcap``): phi and the walk are DiffCAP's (``DiffCAP.embed`` / ``DiffCAP.walk``),
the adversarial images the harness' attack and cache. Writes results/calibration/tau_<dataset>_<vlm>_<task>_step<s>.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from diffcap.purifiers import DiffCAP  # noqa: E402
from evaluators.config import PROJECT_ROOT, compose_config, validate  # noqa: E402
from evaluators.errors import ConfigError, cli  # noqa: E402
from evaluators.runner import build, clean_and_adversarial  # noqa: E402
from evaluators.seeding import derive_seed, generators  # noqa: E402

log = logging.getLogger("calibrate_tau")


def first_pass(sims: np.ndarray, tau: float) -> np.ndarray:
    """Stopping step per image for a tau (the walk's length when it never passes)."""
    passed = sims > tau
    return np.where(passed.any(1), passed.argmax(1), sims.shape[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="captioning")
    parser.add_argument("--steps", type=int, default=150, help="forward moves to trace")
    parser.add_argument("--step", type=int, default=1, help="DDPM steps per move, as defense.step (1 = 1/1000)")
    args, overrides = parser.parse_known_args()
    if args.steps < 1 or args.step < 1 or args.steps * args.step > 1000:
        parser.error(f"--steps * --step must be between 1 and 1000 DDPM steps, got {args.steps} * {args.step}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = ["attack=apgd", "n_samples=100", "defense=diffcap", f"defense.step={args.step}",
                 f"tasks=[{args.task}]", *overrides]
    cfg = compose_config(overrides)
    validate(cfg)
    h = build(cfg, Path(cfg.paths.output_dir))
    if not isinstance(h.defense, DiffCAP):
        raise ConfigError(f"calibrate_tau.py needs defense=diffcap, got defense={cfg.defense.name}")
    samples, x, x_adv = clean_and_adversarial(h, args.task)
    diffcap: DiffCAP = h.defense
    bs = int(cfg.batch_size)
    seeds = [derive_seed(cfg.seed.noise, "calibrate", s["id"]) for s in samples]
    with torch.no_grad():
        pair_sim = (diffcap.embed(x) * diffcap.embed(x_adv)).sum(-1).cpu().numpy()
        sims = {name: torch.cat([diffcap.walk(imgs[i : i + bs], generators(seeds[i : i + bs]), until_stable=False,
                                              moves=args.steps).similarities
                                 for i in range(0, len(samples), bs)]).numpy()
                for name, imgs in (("clean", x), ("adv", x_adv))}
    tau = float(pair_sim.mean())
    grid = [0.90, 0.94, 0.96, 0.98, round(tau, 4)]
    stops = {f"{t:g}": {name: {"mean_step": float(first_pass(s, t).mean()),
                               "never_passed": float((first_pass(s, t) == args.steps).mean())}
                        for name, s in sims.items()} for t in grid}
    result = {
        "overrides": overrides, "task": args.task, "n_pairs": len(samples), "moves": args.steps, "step": args.step,
        "suggested_tau": tau, "pair_similarity": {"mean": tau, "std": float(pair_sim.std()),
                                                  "p10": float(np.quantile(pair_sim, 0.1)),
                                                  "p90": float(np.quantile(pair_sim, 0.9))},
        "mean_curve": {name: s.mean(0).tolist() for name, s in sims.items()},
        "stopping_step_by_tau": stops,
    }
    out = PROJECT_ROOT / "results" / "calibration" / f"tau_{cfg.dataset.name}_{cfg.vlm.name}_{args.task}_step{args.step}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    fig, ax = plt.subplots(figsize=(6.5, 4))
    steps = np.arange(1, args.steps + 1)
    for name, s in sims.items():
        m, sd = s.mean(0), s.std(0)
        ax.plot(steps, m, label=f"{name} inputs")
        ax.fill_between(steps, m - sd, m + sd, alpha=0.2)
    ax.axhline(tau, color="k", ls="--", lw=1, label=f"suggested tau = {tau:.3f}")
    ax.set_xlabel(f"forward move m (t = {args.step} m / 1000)")
    ax.set_ylabel("cos(phi(x_{k+1}), phi(x_k))")
    ax.set_title(f"tau calibration, {cfg.dataset.name} / {cfg.vlm.name}, {len(samples)} pairs")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print(json.dumps({k: result[k] for k in ("suggested_tau", "pair_similarity", "stopping_step_by_tau")}, indent=2))


if __name__ == "__main__":
    cli(main)
