"""Attack benchmark: APGD steps per second for each VLM adapter, batched against one image at a time (RobustVLM
attacks one image at a time), with peak memory; the VLM adapters' speed options against their defaults; and the
adversarial cache's saving in a defense sweep.

    python scripts/bench_attack.py n_samples=16 attack.steps=10
    python scripts/bench_attack.py --vlms tiny_clip --parts throughput --batches 1,4,16

Parts (``--parts``, default throughput and cache):
  throughput  per VLM (``--vlms``, each on its first task: captioning, or zero-shot classification for CLIP):
              the first stage of the task's attack objective (the loss the runner's attack maximises) run by
              the configured APGD on ``n_samples`` clean images, at each ``--batches`` batch size; image-steps
              per second (images x steps / seconds), the ratio to the smallest batch, peak memory; and the
              unit costs of one APGD step and one prediction per image (``unit_costs.json`` beside the
              results: results/bench/unit_costs.json by default, the table the cost model reads).
  cache       a defense sweep (``--defenses``) through the runner's ``run`` in fresh folders, once reading the
              adversarial cache (the first job attacks, the others hit) and once with attack.from_cache=false;
              the saving is 1 - time with cache / time without.
  options     per VLM whose config has the option: each of ``VLM_OPTIONS`` against the default, in one process,
              APGD at each batch size alternating default and option; the relative change of the losses and of
              the pixel gradient on the clean images; kept only when within tolerance and faster in every repeat.

Arguments key=value are Hydra overrides of configs/run.yaml for every VLM. Everything is built by the runner's
``build`` (VLM, task, attack); the clean images come through ``clean_and_adversarial``. Writes
<out>_<part>.json and .md (default results/bench/attack_*).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from omegaconf import OmegaConf

from diffcap import perf
from evaluators import cost
from evaluators.config import PROJECT_ROOT, compose_config, select_tasks, vlm_tasks
from evaluators.errors import ConfigError, cli
from evaluators.runner import build, clean_and_adversarial, run
from evaluators.seeding import derive_seed, generators

log = logging.getLogger("bench_attack")
VLMS = ("tiny_llava", "tiny_openflamingo", "tiny_clip")
#: speed options of the VLM adapters (config overrides), measured on each VLM whose config has the key
VLM_OPTIONS = ("vlm.attention=sdpa",)
#: an option computes the same function if no per-sample loss and not the pixel gradient move by more than this
LOSS_TOLERANCE = 1e-5


def time_apgd(apgd, loss, x: torch.Tensor, seeds: list[int], batch: int, device) -> float:
    """Seconds for APGD on every image of ``x``, ``batch`` images per run (one generator per image)."""
    perf.synchronize(device)
    tic = time.perf_counter()
    for i in range(0, x.shape[0], batch):
        idx = torch.arange(i, min(i + batch, x.shape[0]), device=x.device)
        apgd.perturb(loss, x[idx], index=idx, generators=generators([seeds[j] for j in idx.tolist()]))
    perf.synchronize(device)
    return time.perf_counter() - tic


def setup(vlm: str, overrides: list[str]) -> SimpleNamespace:
    """The runner's harness for ``vlm`` on its first task, the clean images, and the first APGD stage."""
    cfg = compose_config([f"vlm={vlm}", "attack=apgd", "defense=none", *overrides])
    if not cfg.tasks:  # the VLM's first task only (building the others would only cost time)
        cfg = compose_config([f"vlm={vlm}", "attack=apgd", "defense=none", *overrides,
                              f"tasks=[{select_tasks(cfg, vlm_tasks(cfg))[0]}]"])
    h = build(cfg, Path(cfg.paths.output_dir))
    task_name = next(iter(h.tasks))
    task, device = h.tasks[task_name], torch.device(cfg.device)
    samples, x, _ = clean_and_adversarial(h, task_name)
    protocol = cfg.attack.get("zero_shot")
    objective = task.objective(h.vlm, samples, cfg.attack.schedule, x_clean=x,
                               protocol=None if protocol is None else OmegaConf.to_container(protocol))
    stage = objective.stages[0]
    seeds = [derive_seed(cfg.seed.noise, "bench_attack", s["id"]) for s in samples]
    return SimpleNamespace(cfg=cfg, h=h, task_name=task_name, task=task, device=device, samples=samples, x=x,
                           stage=stage, apgd=h.attack.stage_attack(stage), seeds=seeds)


def throughput(vlm: str, args, overrides: list[str]) -> tuple[list[dict], list[cost.Unit]]:
    bench = setup(vlm, overrides)
    cfg, h, task_name, task, device = bench.cfg, bench.h, bench.task_name, bench.task, bench.device
    samples, x, stage, apgd, seeds = bench.samples, bench.x, bench.stage, bench.apgd, bench.seeds
    n, steps = x.shape[0], apgd.steps
    time_apgd(apgd, stage.loss, x[: min(args.batches)], seeds, min(args.batches), device)  # warm-up
    rows, times = [], {b: [] for b in args.batches}
    memory = {}
    for r in range(args.repeats):
        for b in (args.batches if r % 2 == 0 else args.batches[::-1]):
            with perf.peak_memory(device) as mem:
                times[b].append(time_apgd(apgd, stage.loss, x, seeds, b, device))
            memory[b] = mem
    for b in args.batches:
        sec = statistics.median(times[b])
        rows.append({"vlm": vlm, "task": task_name, "stage": stage.name, "images": n, "batch": b, "steps": steps,
                     "seconds": sec, "seconds_all": times[b], "image_steps_per_second": n * steps / sec,
                     "peak_mib": memory[b]["peak_mib"], "base_mib": memory[b]["base_mib"],
                     "memory_kind": memory[b]["kind"]})
    small = next(r for r in rows if r["batch"] == min(args.batches))
    for r in rows:
        r["throughput_over_smallest_batch"] = r["image_steps_per_second"] / small["image_steps_per_second"]
    big = max(args.batches)
    with torch.no_grad():
        predict = perf.median_seconds(lambda: task.predict(h.vlm, x[:big], samples[:big]), args.repeats,
                                      device=device)
    precision = cost.architectures(cfg)["vlm_predict"][1]
    mach = cost.machine()
    units = [cost.Unit(vlm, "vlm_fwd_bwd", precision, device.type, b["batch"], b["seconds"] / (n * (steps + 1)),
                       source="scripts/bench_attack.py (APGD: steps + 1 loss/gradient evaluations per image)",
                       machine=mach) for b in rows]
    units.append(cost.Unit(vlm, "vlm_predict", precision, device.type, min(big, n), predict / min(big, n),
                           source=f"scripts/bench_attack.py ({task_name} predictions)", machine=mach))
    return rows, units


def loss_change(a: SimpleNamespace, b: SimpleNamespace) -> tuple[float, float]:
    """(largest relative change of a per-sample loss, relative change of the pixel gradient) between two
    setups of the same VLM on the same clean images: the same function within float rounding, or not."""
    out = []
    for s in (a, b):
        x = s.x.detach().clone().requires_grad_(True)
        loss = s.stage.loss(x, torch.arange(x.shape[0], device=x.device))
        (grad,) = torch.autograd.grad(loss.sum(), x)
        out.append((loss.detach(), grad))
    (la, ga), (lb, gb) = out
    return float((la - lb).abs().max() / la.abs().max()), float((ga - gb).norm() / ga.norm())


def options(vlm: str, args, overrides: list[str]) -> list[dict]:
    """Each VLM speed option (``VLM_OPTIONS``) the VLM's config has, against its default, in one process: APGD
    runs at each batch size alternating default and option (paired repeats), and the change of the losses and
    of the pixel gradient. Kept (default on) = within ``LOSS_TOLERANCE`` and faster by the shared rule at every
    batch size."""
    rows = []
    base = setup(vlm, overrides)
    for name in VLM_OPTIONS:
        key, value = name.split("=", 1)
        default = OmegaConf.select(base.cfg, key)
        if default is None or str(default).lower() == value.lower():
            continue  # this VLM has no such option, or it is on already
        alt = setup(vlm, [*overrides, name])
        loss_rel, grad_rel = loss_change(base, alt)
        same = max(loss_rel, grad_rel) <= LOSS_TOLERANCE
        mine = []
        for b in args.batches:
            for s in (base, alt):  # warm-up
                time_apgd(s.apgd, s.stage.loss, s.x[:b], s.seeds, b, s.device)
            secs: dict[str, list[float]] = {"default": [], "option": []}
            for r in range(args.repeats):
                pair = [(base, "default"), (alt, "option")] if r % 2 == 0 else [(alt, "option"), (base, "default")]
                for s, tag in pair:
                    secs[tag].append(time_apgd(s.apgd, s.stage.loss, s.x, s.seeds, b, s.device))
            gains = [d / o for d, o in zip(secs["default"], secs["option"], strict=True)]
            mine.append({"vlm": vlm, "option": name, "default": str(default), "task": base.task_name,
                         "images": base.x.shape[0], "batch": b, "steps": base.apgd.steps, "seconds": secs,
                         "speedups": gains, "speedup": statistics.median(gains), "loss_change": loss_rel,
                         "gradient_change": grad_rel, "tolerance": LOSS_TOLERANCE, "within_tolerance": same})
        kept = same and all(cost.faster(r["speedups"]) for r in mine)  # at every batch size
        rows += [{**r, "kept": kept} for r in mine]
    return rows


def cache_saving(args, overrides: list[str]) -> dict:
    root = Path(tempfile.mkdtemp(prefix="bench_attack_cache_"))
    sweeps: dict[str, list[dict]] = {}
    def job(mode: str, d: str, extra: str) -> dict:
        cfg = compose_config([f"vlm={args.sweep_vlm}", "attack=apgd", f"defense={d}", *overrides, extra,
                              f"paths.cache_dir={root / mode / 'cache'}"], output_dir=root / mode / d)
        tic = time.perf_counter()
        summary = run(cfg)
        sec = time.perf_counter() - tic
        stages = {k: v for t in summary["timing_seconds"].values() for k, v in t.items()}
        return {"defense": d, "seconds": sec, "stage_seconds": stages, "recorded_seconds": sum(stages.values()),
                "cache": summary.get("cache")}

    try:
        job("warmup", args.defenses[0], "attack.from_cache=false")  # first-run costs (Java, tokenizers) go here
        for mode, extra in (("with_cache", "attack.from_cache=true"), ("without_cache", "attack.from_cache=false")):
            sweeps[mode] = [job(mode, d, extra) for d in args.defenses]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    wall = {m: sum(j["seconds"] for j in jobs) for m, jobs in sweeps.items()}
    recorded = {m: sum(j["recorded_seconds"] for j in jobs) for m, jobs in sweeps.items()}
    return {"vlm": args.sweep_vlm, "defenses": args.defenses, "jobs": sweeps, "total_seconds": wall,
            "recorded_seconds": recorded, "saving": 1 - recorded["with_cache"] / recorded["without_cache"],
            "saving_wall": 1 - wall["with_cache"] / wall["without_cache"]}


def markdown(part: str, res: dict) -> str:
    if part == "throughput":
        lines = ["| vlm | task | batch | image-steps/s | x smallest batch | peak - base (MiB) | memory |",
                 "|" + " --- |" * 7]
        for r in res["rows"]:
            mem = "-" if r["peak_mib"] is None else f"{r['peak_mib'] - (r['base_mib'] or 0):.0f}"
            lines.append(f"| {r['vlm']} | {r['task']} | {r['batch']} | {r['image_steps_per_second']:.2f} | "
                         f"{r['throughput_over_smallest_batch']:.2f} | {mem} | {r['memory_kind']} |")
    elif part == "options":
        lines = ["| vlm | option (default) | batch | speed-up (median) | speed-ups per repeat | loss change | "
                 "gradient change | kept |", "|" + " --- |" * 8]
        for r in res["rows"]:
            lines.append(f"| {r['vlm']} | {r['option']} ({r['default']}) | {r['batch']} | {r['speedup']:.3f} | "
                         + ", ".join(f"{g:.2f}" for g in r["speedups"]) + f" | {r['loss_change']:.1e} | "
                         f"{r['gradient_change']:.1e} | {'yes' if r['kept'] else 'no'} |")
        lines += ["", res["rule"]]
    else:
        lines = ["| sweep | " + " | ".join(res["defenses"]) + " | recorded total (s) | wall total (s) |",
                 "|" + " --- |" * (len(res["defenses"]) + 3)]
        for mode, jobs in res["jobs"].items():
            lines.append(f"| {mode} | " + " | ".join(f"{j['recorded_seconds']:.1f}" for j in jobs) +
                         f" | {res['recorded_seconds'][mode]:.1f} | {res['total_seconds'][mode]:.1f} |")
        lines += ["", f"Saving of the cache: **{100 * res['saving']:.1f} %** of the sweep's recorded time (the "
                  f"runner's per-stage seconds: load, attack, defense, predict), {100 * res['saving_wall']:.1f} % "
                  "of its wall time (models loaded once per job, after a warm-up job)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = cost.OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="throughput,cache")
    p.add_argument("--vlms", default=",".join(VLMS))
    p.add_argument("--batches", default="1,16", help="batch sizes (images per APGD run)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--defenses", default="none,diffpure,diffcap")
    p.add_argument("--sweep-vlm", default="tiny_llava")
    p.add_argument("--out", type=Path, default=PROJECT_ROOT / "results" / "bench" / "attack")
    args, overrides = p.parse_known_args()
    args.parts = cost.comma_list("--parts", args.parts, allowed=("throughput", "cache", "options"))
    args.vlms = cost.comma_list("--vlms", args.vlms)
    args.defenses = cost.comma_list("--defenses", args.defenses, allowed=("none", "diffpure", "diffcap"))
    args.batches = sorted(set(cost.comma_list("--batches", args.batches, int)))
    if not args.batches or args.batches[0] < 1 or args.repeats < 1:
        raise ConfigError("--batches must list integers >= 1 and --repeats must be >= 1")
    cost.check_overrides(overrides)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = ["n_samples=16", "batch_size=16", "attack.steps=10", *overrides]
    for part in args.parts:
        before = cost.machine()
        if part == "throughput":
            rows, units = [], []
            for vlm in args.vlms:
                r, u = throughput(vlm, args, overrides)
                rows += r
                units += u
            cost.write_units(args.out.parent / cost.UNIT_FILE, units)
            res = {"rows": rows}
        elif part == "options":
            res = {"rows": [r for vlm in args.vlms for r in options(vlm, args, overrides)],
                   "rule": f"Kept (default on) = losses and pixel gradient within {LOSS_TOLERANCE:g} (relative) and "
                           f"at least {cost.MIN_GAIN}x faster (median of paired repeats; faster in every repeat) at "
                           "every batch size."}
        else:
            res = cache_saving(args, overrides)
        res = {"part": part, "overrides": overrides, "args": {k: v for k, v in vars(args).items() if k != "out"},
               "machine_before": before, **res, "machine_after": cost.machine()}
        cost.write_part(args.out, part, res, markdown(part, res))


if __name__ == "__main__":
    cli(main)
