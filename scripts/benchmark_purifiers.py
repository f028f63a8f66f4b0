"""Purification benchmark: DiffPure and DiffCAP on the same clean and attacked images in one process, for each
reverse sampler, with the ratios that say how close each runs to the hardware's limit.

    python scripts/benchmark_purifiers.py vlm=tiny_llava n_samples=64 batch_size=16 attack.steps=10 --tau 0.999998
    python scripts/benchmark_purifiers.py vlm=tiny_llava --parts options --options all

Parts (``--parts``, default all three):
  main     for each sampler (``--samplers``) and input (clean, adv): seconds and images per second of each
           purifier on the first ``--images`` images at ``batch_size``, denoiser and encoder evaluations per
           image, and in the same run: DiffCAP / DiffPure time, and measured time / evaluation bound. The bound
           is the time of the purifier's own network calls alone: every batched call (the samplers and the walk
           call the network on the images still active; ``diffcap.perf.call_sizes``) costs one batched
           evaluation of its size, timed (median of ``--unit-repeats``) right before and after each block of
           repeats. A denoiser evaluation is ``Denoiser.forward``; an encoder evaluation is DiffCAP's phi on a
           state (``DiffCAP.phi``: to pixels, resize to the VLM's input, encode, normalise); "bare encoder"
           counts the VLM's encoder alone. "packed" is the bound if every evaluation ran in a full batch; the
           reverse pass's bound is also given for the other groupings (``defense.reverse_grouping``).
  scaling  images per second of both purifiers on all ``n_samples`` attacked images at each ``--scaling`` batch.
  options  each speed option (a config override) against the default: speed-up and the largest change of a
           purified pixel and of DiffCAP's stopping times; kept only when faster and within tolerance.

DiffCAP runs with ``--tau``, a threshold at which it walks and denoises (at the default tau the embedded models
stop every image at t = 0). Arguments key=value are Hydra overrides of configs/run.yaml; everything is built
by the runner's ``build`` and ``build_defense``, the attacked images come from the harness's attack and cache.
Writes <out>_<part>.json and .md (default results/bench/purifiers_*), and the measured unit costs to
``unit_costs.json`` beside them (results/bench/unit_costs.json by default, the table the cost model reads).
"""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from diffcap import perf
from evaluators import cost
from evaluators.config import PROJECT_ROOT, compose_config
from evaluators.errors import ConfigError, cli
from evaluators.runner import build, build_defense, clean_and_adversarial
from evaluators.seeding import derive_seed, generators

log = logging.getLogger("benchmark_purifiers")
SAMPLERS = ("sde", "ddpm", "ddim")
#: speed options: name -> (overrides, tolerance class); "exact" = the same function, "precision" = lower precision
OPTIONS = {
    "denoiser.autocast=bfloat16": "precision", "denoiser.channels_last=true": "exact",
    "denoiser.channels_last=false": "exact",
    "denoiser.attention=sdpa": "exact", "denoiser.compile=true": "exact", "defense.inference_mode=true": "exact",
    "defense.encoder_autocast=bfloat16": "precision", "defense.compile_encoder=true": "exact",
    "defense.reuse_embedding=true": "exact", "defense.reverse_grouping=start": "exact",
    "defense.reverse_grouping=image": "exact",
}
#: largest change of a purified pixel ([0, 1] units) for each tolerance class; DiffCAP's stopping times must not move
TOLERANCE = {"exact": 1e-4, "precision": 1.0 / 255}
#: ... and only if its one-time cost (compilation) is repaid within this many purified images
PAYBACK_IMAGES = 1000


def run_set(purifier, x: torch.Tensor, seeds: list[int], batch: int, device, draws: int = 1):
    """Purify ``x`` in batches (``draws`` times each, as the runner's evaluation draws): seconds, outputs, infos."""
    outs, infos = [], []
    perf.synchronize(device)
    tic = time.perf_counter()
    for i in range(0, x.shape[0], batch):
        for d in range(draws):
            y, inf = purifier.purify(x[i: i + batch], generators([s + d for s in seeds[i: i + batch]], device))
            outs.append(y)
            infos.extend(inf)
    perf.synchronize(device)
    return time.perf_counter() - tic, torch.cat(outs), infos


def sizes_of(infos: list, batch: int, field: str, grouping: str = "rounds") -> list[int]:
    """Batch sizes of the network calls behind ``infos`` (one purified set, batches of ``batch``); the reverse
    pass's (``denoiser_evals``) as grouped by ``grouping``."""
    return [n for i in range(0, len(infos), batch)
            for n in perf.grouped_call_sizes([getattr(q, field) for q in infos[i: i + batch]],
                                             [q.t for q in infos[i: i + batch]], grouping)]


class Bench:
    """The built harness, purifiers and unit timers of one benchmark process."""

    def __init__(self, args, overrides: list[str]):
        self.args, self.overrides = args, overrides
        self.cfgs = {(s, d): self.compose(d, s) for s in args.samplers for d in ("diffpure", "diffcap")}
        first = self.cfgs[(args.samplers[0], "diffcap")]
        self.cfg, self.device, self.batch = first, torch.device(first.device), int(first.batch_size)
        self.h = build(first, Path(first.paths.output_dir))
        samples, self.x, self.x_adv = clean_and_adversarial(self.h, args.task)
        self.seeds = [derive_seed(first.seed.noise, "benchmark", s["id"]) for s in samples]
        self.purifiers = {k: self.defense(c) for k, c in self.cfgs.items()}
        some_cap = self.purifiers[(args.samplers[0], "diffcap")]
        self.den = self.unit_table(some_cap.denoiser)
        self.enc = self.encoder_table(some_cap, bare=False)
        self.enc_bare = self.encoder_table(some_cap, bare=True)

    def compose(self, defense: str, sampler: str, extra: tuple[str, ...] = ()):
        tau = [f"defense.tau={self.args.tau}"] if defense == "diffcap" else []
        return compose_config([*self.overrides, f"defense={defense}", f"defense/sampler={sampler}", *tau, *extra])

    def defense(self, cfg):
        return build_defense(cfg, self.h.vlm, self.device)

    def unit_table(self, denoiser) -> perf.UnitTable:
        r = int(denoiser.resolution)

        def call(n: int):
            z = torch.randn(n, 3, r, r, generator=torch.Generator().manual_seed(n)).to(self.device)
            t = torch.full((n,), 0.1, device=self.device)
            return lambda: _no_grad(denoiser, z, t)
        return perf.UnitTable(call, self.args.unit_repeats, self.device)

    def encoder_table(self, diffcap, bare: bool) -> perf.UnitTable:
        """One encoder evaluation: phi on a state (to pixels, resize, encode, normalise: ``DiffCAP.phi``), or with
        ``bare`` the VLM's encoder alone on pixels (``DiffCAP.encode``)."""
        r, rd = int(self.h.vlm.resolution), int(diffcap.resolution)

        def call(n: int):
            g = torch.Generator().manual_seed(n)
            if bare:
                px = torch.rand(n, 3, r, r, generator=g).to(self.device)
                return lambda: _no_grad(diffcap.encode, px)
            z = (torch.rand(n, 3, rd, rd, generator=g) * 2 - 1).to(self.device)
            return lambda: _no_grad(diffcap.phi, z, r)
        return perf.UnitTable(call, self.args.unit_repeats, self.device)


@torch.no_grad()
def _no_grad(fn, *a):
    return fn(*a)


def part_main(b: Bench) -> dict:
    args, bs = b.args, b.batch
    n = min(args.images or bs, b.x.shape[0])
    b.den.measure(range(1, bs + 1))
    b.enc.measure(range(1, bs + 1))
    b.enc_bare.measure(range(1, bs + 1))
    rows, ratios = [], []
    for sampler in args.samplers:
        for cond, images in (("clean", b.x[:n]), ("adv", b.x_adv[:n])):
            times: dict[str, list[float]] = {"diffpure": [], "diffcap": []}
            infos: dict[str, list] = {}
            for r in range(args.repeats):
                for d in (("diffpure", "diffcap") if r % 2 == 0 else ("diffcap", "diffpure")):
                    sec, _, infos[d] = run_set(b.purifiers[(sampler, d)], images, b.seeds[:n], bs, b.device)
                    times[d].append(sec)
            den_sizes = {d: sizes_of(inf, bs, "denoiser_evals") for d, inf in infos.items()}
            enc_sizes = {d: sizes_of(inf, bs, "encoder_evals") for d, inf in infos.items()}
            b.den.measure(den_sizes["diffpure"] + den_sizes["diffcap"])  # after the block
            b.enc.measure(enc_sizes["diffcap"])
            b.enc_bare.measure(enc_sizes["diffcap"])
            for d, inf in infos.items():
                den_bound = perf.bound_seconds(den_sizes[d], b.den.unit(den_sizes[d]))
                bound = den_bound + perf.bound_seconds(enc_sizes[d], b.enc.unit(enc_sizes[d]))
                bare = den_bound + perf.bound_seconds(enc_sizes[d], b.enc_bare.unit(enc_sizes[d]))
                den_evals = sum(i.denoiser_evals for i in inf)
                enc_evals = sum(i.encoder_evals for i in inf)
                packed = perf.packed_bound(den_evals, bs, b.den.unit([bs])[bs]) + \
                    perf.packed_bound(enc_evals, bs, b.enc.unit([bs])[bs])
                sec = statistics.median(times[d])
                rows.append({
                    "sampler": sampler, "input": cond, "purifier": d, "images": n, "batch": bs,
                    "seconds": sec, "seconds_all": times[d], "images_per_second": n / sec,
                    "denoiser_evals_per_image": den_evals / n, "encoder_evals_per_image": enc_evals / n,
                    "t_mean": statistics.fmean(i.t for i in inf), "t_max": max(i.t for i in inf),
                    "converged": statistics.fmean(i.converged for i in inf),
                    "bound_seconds": bound, "packed_bound_seconds": packed,
                    "measured_over_bound": statistics.median(t / bound for t in times[d]) if bound else None,
                    "measured_over_packed": statistics.median(t / packed for t in times[d]) if packed else None,
                    "bound_bare_encoder_seconds": bare,
                    "measured_over_bare_encoder_bound": statistics.median(t / bare for t in times[d]) if bare else None,
                    "calls": {"denoiser": len(den_sizes[d]), "encoder": len(enc_sizes[d])},
                    # the reverse pass's bound under the other groupings (same images, same evaluations)
                    "denoiser_bound_by_grouping": {g: perf.bound_seconds(s_, b.den.unit(s_)) for g in perf.REVERSE_GROUPINGS
                                                   for s_ in [sizes_of(inf, bs, "denoiser_evals", g)]},
                })
            ratios.append({"sampler": sampler, "input": cond, "diffcap_over_diffpure": statistics.median(
                c / p for c, p in zip(times["diffcap"], times["diffpure"], strict=True))})
    units = [cost.Unit(arch, kind, "float32" if prec is None else str(prec).replace("torch.", ""),
                       b.device.type, bs, table.unit([bs])[bs] / bs, source="scripts/benchmark_purifiers.py",
                       machine=cost.machine())
             for kind, table, arch, prec in (
                 ("denoiser_eval", b.den, cost.architectures(b.cfg)["denoiser_eval"][0], b.cfg.denoiser.autocast),
                 ("encoder_eval", b.enc, str(b.cfg.vlm.name), b.cfg.defense.encoder_autocast))]
    cost.write_units(b.args.out.parent / cost.UNIT_FILE, units)
    return {"rows": rows, "ratios": ratios,
            "unit_seconds": {"denoiser": b.den.history, "encoder_phi": b.enc.history, "encoder_bare": b.enc_bare.history}}


def part_scaling(b: Bench) -> dict:
    args, sampler = b.args, b.args.scaling_sampler
    keys = {d: (sampler, d) for d in ("diffpure", "diffcap")}
    missing = [k for k in keys.values() if k not in b.purifiers]
    for k in missing:
        b.purifiers[k] = b.defense(b.compose(k[1], k[0]))
    rows = []
    for batch in args.scaling:
        b.den.measure([batch])
        for d, key in keys.items():
            secs, infos = [], None
            for _ in range(args.scaling_repeats):
                sec, _, infos = run_set(b.purifiers[key], b.x_adv, b.seeds, batch, b.device)
                secs.append(sec)
            sec = statistics.median(secs)
            den = sum(i.denoiser_evals for i in infos)
            rows.append({"sampler": sampler, "purifier": d, "batch": batch, "images": b.x_adv.shape[0],
                         "seconds": sec, "images_per_second": b.x_adv.shape[0] / sec,
                         "denoiser_evals_per_image": den / len(infos),
                         "denoiser_seconds_per_image_at_batch": b.den.unit([batch])[batch] / batch})
    for r in rows:
        one = next(q for q in rows if q["purifier"] == r["purifier"] and q["batch"] == min(args.scaling))
        r["throughput_over_smallest_batch"] = r["images_per_second"] / one["images_per_second"]
    return {"rows": rows}


def part_options(b: Bench) -> dict:
    args, bs, sampler = b.args, b.batch, b.args.options_sampler
    n = min(args.images or bs, b.x.shape[0])
    x, seeds = b.x_adv[:n], b.seeds[:n]
    rows = []
    for name in args.options:
        tol_class = OPTIONS[name]
        defenses = ("diffcap",) if name.startswith(("defense.encoder", "defense.compile", "defense.reuse",
                                                      "defense.reverse")) else ("diffpure", "diffcap")
        for d in defenses:
            key, value = name.split("=", 1)
            if str(OmegaConf.select(b.compose(d, sampler), key)).lower() == value.lower():
                continue  # already the default: its opposite is measured instead
            base = b.defense(b.compose(d, sampler))
            try:
                tic = time.perf_counter()
                variant = b.defense(b.compose(d, sampler, (name,)))
                draws = 2 if "reuse" in name else 1
                run_set(variant, x, seeds, bs, b.device, draws)  # warm-up (and compilation)
                warm = time.perf_counter() - tic
            except Exception as e:  # noqa: BLE001 (a speed option that fails to build or run is reported, dropped)
                rows.append({"option": name, "purifier": d, "error": str(e).splitlines()[0][:300], "kept": False})
                continue
            run_set(base, x, seeds, bs, b.device, draws)
            gains, diffs, t_moved, secs = [], 0.0, 0.0, {"b": [], "v": []}
            for r in range(args.repeats):
                pair = [(base, "b"), (variant, "v")] if r % 2 == 0 else [(variant, "v"), (base, "b")]
                got = {tag: run_set(p, x, seeds, bs, b.device, draws) for p, tag in pair}
                gains.append(got["b"][0] / got["v"][0])
                secs["b"].append(got["b"][0])
                secs["v"].append(got["v"][0])
                diffs = max(diffs, float((got["b"][1] - got["v"][1]).abs().max()))
                t_moved = max(t_moved, max(abs(i.t - j.t) for i, j in zip(got["b"][2], got["v"][2], strict=True)))
            gain = statistics.median(gains)
            same_calls = None
            if name.startswith("defense.reverse_grouping"):  # regrouping cannot help where the calls are the same
                grouping = name.split("=", 1)[1]
                same_calls = sizes_of(got["b"][2], bs, "denoiser_evals") == \
                    sizes_of(got["v"][2], bs, "denoiser_evals", grouping)
            long_check = None
            if tol_class == "precision" and name.startswith("denoiser") and args.check_sampler != sampler:
                # a precision change accumulates over steps: check it on the long reverse pass too (untimed)
                k = min(args.check_images, n)
                pair = [b.defense(b.compose(d, args.check_sampler, extra)) for extra in ((), (name,))]
                outs = [run_set(q, x[:k], seeds[:k], bs, b.device)[1] for q in pair]
                long_check = float((outs[0] - outs[1]).abs().max())
            ok = max(diffs, long_check or 0.0) <= TOLERANCE[tol_class] and t_moved == 0
            saving = (statistics.median(secs["b"]) - statistics.median(secs["v"])) / (n * draws)
            one_time = max(warm - statistics.median(secs["v"]), 0.0)
            payback = one_time / saving if saving > 0 else None
            rows.append({"option": name, "purifier": d, "sampler": sampler, "images": n, "batch": bs,
                         "speedup": gain, "speedups": gains, "max_pixel_change": diffs, "max_t_change": t_moved,
                         "max_pixel_change_check_sampler": long_check, "check_sampler": args.check_sampler,
                         "tolerance": TOLERANCE[tol_class], "within_tolerance": ok,
                         "warmup_seconds": warm, "one_time_seconds": one_time, "payback_images": payback,
                         "same_calls_as_default": same_calls,
                         "kept": ok and tol_class == "exact" and cost.faster(gains)
                         and payback is not None and payback <= PAYBACK_IMAGES and not same_calls})
    return {"rows": rows, "min_gain": cost.MIN_GAIN, "tolerance": TOLERANCE, "payback_images": PAYBACK_IMAGES,
            "rule": "kept (default on) = same function within the exact tolerance, stopping times unchanged, at "
                    f"least {cost.MIN_GAIN}x faster (median; faster in every repeat), one-time cost repaid within "
                    f"{PAYBACK_IMAGES} images, and for a regrouping other calls than the default's on these images; "
                    "precision changes are never on by default"}


def markdown(part: str, res: dict) -> str:
    if part == "main":
        lines = ["| sampler | input | purifier | s (batch) | images/s | denoiser evals/img | encoder evals/img | "
                 "t mean | measured / bound | measured / packed bound | measured / bound, bare encoder |",
                 "|" + " --- |" * 11]
        for r in res["rows"]:
            lines.append(f"| {r['sampler']} | {r['input']} | {r['purifier']} | {r['seconds']:.3f} | "
                         f"{r['images_per_second']:.2f} | {r['denoiser_evals_per_image']:.1f} | "
                         f"{r['encoder_evals_per_image']:.1f} | {r['t_mean']:.4f} | {_f(r['measured_over_bound'])} | "
                         f"{_f(r['measured_over_packed'])} | {_f(r['measured_over_bare_encoder_bound'])} |")
        lines += ["", "| sampler | input | DiffCAP / DiffPure time |", "| --- | --- | ---: |"]
        lines += [f"| {r['sampler']} | {r['input']} | {r['diffcap_over_diffpure']:.3f} |" for r in res["ratios"]]
        lines += ["", "| sampler | input | DiffCAP reverse-pass bound (s): " + " / ".join(perf.REVERSE_GROUPINGS) + " |",
                  "| --- | --- | ---: |"]
        lines += [f"| {r['sampler']} | {r['input']} | " + " / ".join(f"{r['denoiser_bound_by_grouping'][g]:.2f}"
                  for g in perf.REVERSE_GROUPINGS) + " |" for r in res["rows"] if r["purifier"] == "diffcap"]
    elif part == "scaling":
        lines = ["| sampler | purifier | batch | images/s | x smallest batch | denoiser s/img (unit) |",
                 "|" + " --- |" * 6]
        lines += [f"| {r['sampler']} | {r['purifier']} | {r['batch']} | {r['images_per_second']:.2f} | "
                  f"{r['throughput_over_smallest_batch']:.2f} | {r['denoiser_seconds_per_image_at_batch']:.4f} |"
                  for r in res["rows"]]
    else:
        lines = ["| option | purifier | speed-up | max pixel change (x255) | same, check sampler (x255) | "
                 "max t change | tolerance (x255) | one-time cost (s) | kept |", "|" + " --- |" * 9]
        lines += [f"| {r['option']} | {r['purifier']} | " + (f"error: {r['error']} | | | | | | no |" if "error" in r
                  else f"{r['speedup']:.3f} | {255 * r['max_pixel_change']:.3g} | "
                  f"{_f(None if r['max_pixel_change_check_sampler'] is None else 255 * r['max_pixel_change_check_sampler'])}"
                  f" | {r['max_t_change']:.4f} | {255 * r['tolerance']:.3g} | {r['one_time_seconds']:.1f} | "
                  f"{'yes' if r['kept'] else 'no'} |") for r in res["rows"]]
        lines += ["", f"Rule: {res['rule']}."]
    return "\n".join(lines) + "\n"


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def main() -> None:
    p = cost.OneLineParser(description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="main,scaling,options")
    p.add_argument("--samplers", default="ddim,ddpm,sde")
    p.add_argument("--tau", type=float, default=0.999998, help="DiffCAP's tau (one at which it walks)")
    p.add_argument("--images", type=int, default=None, help="images of the main and options parts (batch_size)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--unit-repeats", type=int, default=3)
    p.add_argument("--scaling", default="1,4,16,64")
    p.add_argument("--scaling-sampler", default="ddim", choices=SAMPLERS)
    p.add_argument("--scaling-repeats", type=int, default=1)
    p.add_argument("--options", default="all", help=f"comma-separated, of: {', '.join(OPTIONS)}")
    p.add_argument("--options-sampler", default="ddim", choices=SAMPLERS)
    p.add_argument("--check-sampler", default="sde", choices=SAMPLERS,
                   help="precision options are also checked (untimed) with this sampler on --check-images images")
    p.add_argument("--check-images", type=int, default=16)
    p.add_argument("--task", default="captioning")
    p.add_argument("--out", type=Path, default=PROJECT_ROOT / "results" / "bench" / "purifiers")
    args, overrides = p.parse_known_args()
    args.parts = cost.comma_list("--parts", args.parts, allowed=("main", "scaling", "options"))
    args.samplers = cost.comma_list("--samplers", args.samplers, allowed=SAMPLERS)
    args.scaling = cost.comma_list("--scaling", args.scaling, int)
    args.options = list(OPTIONS) if args.options == "all" else cost.comma_list("--options", args.options,
                                                                              allowed=OPTIONS)
    if min(args.repeats, args.unit_repeats, args.scaling_repeats, *args.scaling, args.images or 1) < 1:
        raise ConfigError("--repeats, --unit-repeats, --scaling-repeats, --scaling and --images must be >= 1")
    if not 0 < args.tau < 1:
        raise ConfigError(f"--tau={args.tau} is not accepted: a number in (0, 1)")
    cost.check_overrides(overrides)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = ["attack=apgd", "n_samples=16", "batch_size=16", f"tasks=[{args.task}]", *overrides]
    before = cost.machine()
    b = Bench(args, overrides)
    for part in args.parts:
        res = {"part": part, "overrides": overrides, "args": {k: v for k, v in vars(args).items() if k != "out"},
               "tau": args.tau, "machine_before": before,
               **{"main": part_main, "scaling": part_scaling, "options": part_options}[part](b),
               "machine_after": cost.machine()}
        cost.write_part(args.out, part, res, markdown(part, res))


if __name__ == "__main__":
    cli(main)
