"""DiffPure and DiffCAP purifiers, built from configs with ``_target_``.

Both take images in [0, 1] at the VLM's resolution R, resize them bilinearly to the denoiser's resolution
(``antialias``: false by default, as DiffPure's ``F.interpolate(..., mode="bilinear", align_corners=False)``;
true low-pass filters when shrinking), map to [-1, 1], noise and denoise there, map back, clamp to [0, 1] and
resize back to R (same ``antialias``). All randomness comes from one ``torch.Generator`` per image, drawn in a fixed per-image order, so
a batch gives the same per-image results as the same images purified one at a time.

``PurifyInfo.seconds`` divides the batch's wall time fairly: the time of each phase (denoiser loop, DiffCAP's
forward walk with its encoder calls) is shared in proportion to each image's evaluations in that phase, and
the resize overhead equally.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from diffcap import perf
from diffcap.base import Purifier, PurifyInfo, check_flags
from diffcap.samplers import ReverseSDE, Sampler, per_image_noise
from diffcap.schedule import Schedule, schedule_of

log = logging.getLogger(__name__)


def _now(device: torch.device) -> float:
    perf.synchronize(device)
    return time.perf_counter()


def _resize(x: torch.Tensor, size: int, antialias: bool) -> torch.Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=antialias)


def _share(phases: Sequence[tuple[float, torch.Tensor]], n: int) -> list[float]:
    """Split each phase's seconds over images in proportion to their weights (equally if all zero)."""
    total = torch.zeros(n, dtype=torch.float64)
    for seconds, w in phases:
        w = w.double().cpu()
        total += seconds * (w / w.sum() if w.sum() > 0 else torch.full((n,), 1.0 / n, dtype=torch.float64))
    return total.tolist()


def bpda(purifier: Purifier, x: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Purified images whose gradient with respect to ``x`` is the identity (BPDA).

    The forward value is ``purifier.purify(x)`` (run without autograd); the backward pass treats the
    purifier as identity, which is what BPDA+EOT attacks on a diffusion defense differentiate through.
    """
    with torch.no_grad():
        y, _ = purifier.purify(x.detach(), generators)
    return x + (y.to(x) - x).detach()


class DiffusionPurifier(Purifier):
    """Shared plumbing: resizing, [0, 1] <-> [-1, 1], the device the denoiser lives on, and checks.

    The noise schedule is the denoiser's own (``schedule_of``), so noising and denoising always agree.
    """

    randomized = True

    def __init__(self, denoiser: nn.Module, sampler: Sampler | None = None, antialias: bool = False,
                 inference_mode: bool = False):
        super().__init__()
        check_flags("defense", antialias=antialias, inference_mode=inference_mode)
        self.denoiser = denoiser
        self.sampler = sampler if sampler is not None else ReverseSDE()
        self.antialias = antialias
        self.inference_mode = inference_mode  # speed option: torch.inference_mode instead of no_grad

    def _no_grad(self) -> contextlib.AbstractContextManager:
        return perf.no_grad_context(self.inference_mode)

    @property
    def schedule(self) -> Schedule:
        return schedule_of(self.denoiser)

    @property
    def resolution(self) -> int:
        return int(self.denoiser.resolution)

    def _device(self, x: torch.Tensor) -> torch.device:
        p = next(self.denoiser.parameters(), None)
        return p.device if p is not None else x.device

    def _to_model(self, x: torch.Tensor) -> torch.Tensor:
        return _resize(x.float(), self.resolution, self.antialias) * 2 - 1

    def _to_pixels(self, z: torch.Tensor, size: int) -> torch.Tensor:
        return _resize(z.add(1).mul_(0.5).clamp_(0, 1), size, self.antialias).clamp_(0, 1)

    @staticmethod
    def _check_batch(x: torch.Tensor, generators: Sequence[torch.Generator]) -> None:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"purify expects (B, 3, R, R) images, got shape {tuple(x.shape)}")
        if len(generators) != x.shape[0]:
            raise ValueError(f"purify needs one generator per image: {x.shape[0]} images, {len(generators)} generators")


class DiffPure(DiffusionPurifier):
    """Nie et al. 2022: noise every image to the fixed time t* in closed form, then reverse to 0.

    As DiffPure's runners: t* is turned into k* = round(N t*) discrete steps and the image is noised with the
    discrete ``alphas_cumprod[k* - 1]`` (= abar of x_{k*}; the continuous abar(t*) is 0.1 % off at t* = 0.15),
    then the sampler starts at t*. With ``ReverseSDE(dt=1e-3)`` t* = 0.15 costs 150 denoiser evaluations.
    ``sampler`` defaults to ``ReverseSDE()``.
    """

    def __init__(self, denoiser: nn.Module, t_star: float = 0.15, sampler: Sampler | None = None,
                 antialias: bool = False, inference_mode: bool = False):
        super().__init__(denoiser, sampler, antialias, inference_mode)
        if not 0 < t_star <= 1:
            raise ValueError(f"defense.t_star must be in (0, 1], got {t_star}")
        self.t_star = float(t_star)
        if int(self.schedule.steps(self.t_star)) < 1:
            raise ValueError(f"defense.t_star={t_star} is shorter than one of the {self.schedule.num_steps} steps")

    def purify(self, x, generators):
        with self._no_grad():
            return self._purify(x, generators)

    def _purify(self, x, generators):
        self._check_batch(x, generators)
        b, size, home = x.shape[0], x.shape[-1], x.device
        dev = self._device(x)
        start = _now(dev)
        z = self._to_model(x.to(dev))
        t0 = _now(dev)
        sched = self.schedule
        abar = sched.alpha_bars[int(sched.steps(self.t_star))]
        x_t = sched.q_sample(z, abar, per_image_noise(z.shape[1:], generators, z))
        t_vec = torch.full((b,), self.t_star, dtype=torch.float64)
        out, evals = self.sampler.sample(self.denoiser, x_t, t_vec, generators)
        t1 = _now(dev)
        y = self._to_pixels(out, size).to(home)
        end = _now(dev)
        secs = _share([(t0 - start + end - t1, torch.ones(b)), (t1 - t0, evals)], b)
        infos = [
            PurifyInfo(t=self.t_star, steps=int(e), denoiser_evals=int(e), encoder_evals=0, converged=True, seconds=s)
            for e, s in zip(evals.tolist(), secs, strict=True)
        ]
        return y, infos


@dataclass
class Walk:
    """DiffCAP's forward walk for a batch, in model space ([-1, 1] at the denoiser's resolution)."""

    kept: torch.Tensor  # (B, 3, r, r): the state handed to the reverse pass
    k_kept: torch.Tensor  # (B,) long: discrete steps of the kept state
    moves: torch.Tensor  # (B,) long: forward moves walked
    converged: torch.Tensor  # (B,) bool: passed the similarity test (False: stopped by the cap)
    encoder_evals: torch.Tensor  # (B,) long: phi calls, x_0 included
    similarities: torch.Tensor  # (B, checks) float64: cos of consecutive checked embeddings, NaN after stopping


class DiffCAP(DiffusionPurifier):
    """Per-image adaptive noising: walk forward until the embedding stops changing, then reverse.

    Each forward move takes ``step`` DDPM steps (x_{k+s} from x_k with the exact kernel, one noise draw);
    after every ``check_every`` moves the new state is embedded with phi and an image stops as soon as
    cos(phi(new), phi(previous checked state)) > tau. ``keep="before"`` hands the previous checked state to
    the reverse pass, ``keep="after"`` the new one (they differ by step * check_every DDPM steps). Images that
    never pass stop at t_max with ``converged=False`` and keep the state reached there.

    phi sees images in [0, 1] at the input resolution (the noisy state mapped back) and its output is
    L2-normalised here. ``encoder="vlm"`` embeds with the VLM given to ``attach``; ``encoder="clip"`` with
    ``encoder_model`` (a module with ``.embed(x)`` or any callable). The first embedding, of x_0, is of the
    resized-in-and-out input, so that every compared pair went through the same resizing.

    PurifyInfo: ``t`` is the time of the kept state, ``steps`` the forward moves walked, ``encoder_evals``
    the phi calls (x_0 included, unless its embedding was reused), ``denoiser_evals`` those of the reverse pass.

    Speed options (README "Performance"; the defaults are the original computation): ``encoder_autocast`` and
    ``compile_encoder`` run phi's encoder under autocast / through ``torch.compile``; ``reuse_embedding`` keeps
    phi(x_0) of the last batch and reuses it when the same images come again (the runner purifies each batch
    once per evaluation draw; the outputs are identical, only ``encoder_evals`` drops by one);
    ``reverse_grouping``: "rounds" (the samplers' own: every round denoises all images still active),
    "start" (one reverse pass per distinct start time) or "image" (one per image), for measuring the grouping.
    """

    def __init__(
        self,
        denoiser: nn.Module,
        tau: float = 0.96,
        sampler: Sampler | None = None,
        encoder: str = "vlm",
        encoder_model: nn.Module | Callable[[torch.Tensor], torch.Tensor] | None = None,
        keep: str = "before",
        step: int = 1,
        t_max: float = 0.3,
        check_every: int = 1,
        antialias: bool = False,
        inference_mode: bool = False,
        encoder_autocast: str | None = None,
        compile_encoder: bool = False,
        reuse_embedding: bool = False,
        reverse_grouping: str = "rounds",
    ):
        super().__init__(denoiser, sampler, antialias, inference_mode)
        if not 0 < tau < 1:
            raise ValueError(f"defense.tau must be in (0, 1), got {tau}")
        if not 0 < t_max <= 1:
            raise ValueError(f"defense.t_max must be in (0, 1], got {t_max}")
        if int(step) != step or step < 1:
            raise ValueError(f"defense.step must be an integer >= 1, got {step}")
        if int(check_every) != check_every or check_every < 1:
            raise ValueError(f"defense.check_every must be an integer >= 1, got {check_every}")
        if keep not in ("before", "after"):
            raise ValueError(f"defense.keep must be 'before' or 'after', got {keep!r}")
        if encoder not in ("vlm", "clip"):
            raise ValueError(f"defense.encoder must be 'vlm' or 'clip', got {encoder!r}")
        if encoder == "clip" and encoder_model is None:
            raise ValueError("defense.encoder_model must be given when defense.encoder is 'clip'")
        check_flags("defense", compile_encoder=compile_encoder, reuse_embedding=reuse_embedding)
        if reverse_grouping not in perf.REVERSE_GROUPINGS:
            raise ValueError(f"defense.reverse_grouping must be one of {', '.join(perf.REVERSE_GROUPINGS)}, "
                             f"got {reverse_grouping!r}")
        self.encoder_autocast = perf.autocast_dtype(encoder_autocast, "defense.encoder_autocast")
        self.compile_encoder, self.reuse_embedding = compile_encoder, reuse_embedding
        self.reverse_grouping = reverse_grouping
        self._compiled_embed: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._last_x0: tuple[torch.Tensor, torch.Tensor] | None = None  # (input pixels, phi(x_0))
        self.max_moves = math.floor(t_max * self.schedule.num_steps / step + 1e-9)
        if self.max_moves < 1:
            raise ValueError(
                f"defense.t_max={t_max} is shorter than one forward move of defense.step={step} DDPM steps"
            )
        self.tau, self.t_max, self.keep = float(tau), float(t_max), keep
        self.step, self.check_every, self.encoder = int(step), int(check_every), encoder
        self.encoder_model = encoder_model
        self._vlm = None

    def attach(self, vlm: nn.Module) -> None:
        """Remember the defended VLM for ``encoder="vlm"`` (not registered as a submodule)."""
        object.__setattr__(self, "_vlm", vlm)
        self._compiled_embed, self._last_x0 = None, None

    def _embed_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        if self.encoder == "vlm":
            if self._vlm is None:
                raise RuntimeError("DiffCAP with encoder='vlm' needs attach(vlm) before purify")
            return self._vlm.embed
        m = self.encoder_model
        return m.embed if hasattr(m, "embed") else m

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """phi's encoder alone on pixels in [0, 1] at the input resolution, with the speed options."""
        fn = self._embed_fn()
        if self.compile_encoder:
            if self._compiled_embed is None:
                self._compiled_embed = torch.compile(fn)
            fn = self._compiled_embed
        with perf.autocast(pixels.device.type, self.encoder_autocast):
            return fn(pixels)

    def phi(self, z: torch.Tensor, size: int) -> torch.Tensor:
        """phi of states ``z`` in model space: mapped to pixels at ``size``, encoded, L2-normalised. One encoder
        evaluation of the walk (the unit the benchmark's evaluation bound counts for DiffCAP)."""
        return F.normalize(self.encode(self._to_pixels(z, size)).float().flatten(1), dim=1)

    def _phi_x0(self, x: torch.Tensor, z: torch.Tensor, size: int) -> tuple[torch.Tensor, bool]:
        """phi(x_0) and whether it was computed now (False: reused from the last batch of the same pixels)."""
        last = self._last_x0
        if self.reuse_embedding and last is not None and last[0].shape == x.shape and \
                last[0].device == x.device and torch.equal(last[0], x):
            return last[1], False
        emb = self.phi(z, size)
        if self.reuse_embedding:
            self._last_x0 = (x.detach().clone(), emb)
        return emb, True

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """phi of images in [0, 1], L2-normalised, after the same resize round trip as the walk's states."""
        return self.phi(self._to_model(x.to(self._device(x))), x.shape[-1])

    @torch.no_grad()
    def walk(
        self, x: torch.Tensor, generators: Sequence[torch.Generator], until_stable: bool = True,
        moves: int | None = None,
    ) -> Walk:
        """The cumulative forward walk of images ``x`` in [0, 1] (one generator per image).

        ``until_stable=False`` walks every image the full ``moves`` (default: up to t_max) and records the
        similarity at every check without stopping (tau calibration); the kept state then follows ``keep`` at
        the last check.
        """
        self._check_batch(x, generators)
        sched, size = self.schedule, x.shape[-1]
        n_moves = self.max_moves if moves is None else int(moves)
        if not 1 <= n_moves * self.step <= sched.num_steps:
            raise ValueError(f"walk: {n_moves} moves of {self.step} steps do not fit in {sched.num_steps} steps")
        z = self._to_model(x.to(self._device(x)))
        b, dev = z.shape[0], z.device
        sims = torch.full((b, math.ceil(n_moves / self.check_every)), math.nan, dtype=torch.float64)
        emb, fresh = self._phi_x0(x, z, size)
        enc = torch.full((b,), int(fresh), dtype=torch.long)
        moves_t = torch.zeros(b, dtype=torch.long)
        k_kept = torch.zeros(b, dtype=torch.long)
        converged = torch.zeros(b, dtype=torch.bool)
        kept = torch.empty_like(z)
        active = torch.arange(b)  # images still walking; cur/prev/emb hold their rows only
        cur, prev, k_prev, check = z, z, 0, 0
        for m in range(1, n_moves + 1):
            noise = per_image_noise(z.shape[1:], [generators[i] for i in active.tolist()], z)
            cur = sched.forward_move(cur, (m - 1) * self.step, self.step, noise)
            last = m == n_moves
            if m % self.check_every and not last:
                continue
            e = self.phi(cur, size)
            enc[active] += 1
            sim = (e * emb).sum(1).cpu()
            sims[active, check] = sim.double()
            check += 1
            passed = sim > self.tau
            stop = (passed if until_stable else torch.zeros_like(passed)) | last
            if stop.any():
                ids = active[stop]
                before = (passed & (self.keep == "before"))[stop]
                sel = stop.to(dev)
                kept[ids.to(dev)] = torch.where(before.to(dev).view(-1, 1, 1, 1), prev[sel], cur[sel])
                k_kept[ids] = torch.where(before, k_prev, m * self.step)
                moves_t[ids], converged[ids] = m, passed[stop]
                go = (~stop).to(dev)
                active, e, cur = active[~stop], e[go], cur[go]
            emb, prev = e, cur
            k_prev = m * self.step
            if not len(active):
                break
        return Walk(kept, k_kept, moves_t, converged, enc, sims)

    def _reverse(self, kept: torch.Tensor, t_kept: torch.Tensor,
                 generators: Sequence[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
        """The reverse pass, grouped as ``reverse_grouping`` says (each image's result is the same)."""
        groups = perf.reverse_groups(t_kept.tolist(), self.reverse_grouping)
        if len(groups) == 1:
            return self.sampler.sample(self.denoiser, kept, t_kept, generators)
        out, evals = torch.empty_like(kept), torch.zeros(len(t_kept), dtype=torch.long)
        for rows in groups:
            o, e = self.sampler.sample(self.denoiser, kept[rows], t_kept[rows], [generators[i] for i in rows])
            out[torch.tensor(rows, device=kept.device)], evals[rows] = o, e
        return out, evals

    def purify(self, x, generators):
        with self._no_grad():
            return self._purify(x, generators)

    def _purify(self, x, generators):
        self._check_batch(x, generators)
        b, size, home = x.shape[0], x.shape[-1], x.device
        dev = self._device(x)
        start = _now(dev)
        w = self.walk(x, generators)
        t1 = _now(dev)
        t_kept = w.k_kept.double() / self.schedule.num_steps
        out, evals = self._reverse(w.kept, t_kept, generators)
        t2 = _now(dev)
        y = self._to_pixels(out, size).to(home)
        end = _now(dev)
        secs = _share([(end - t2, torch.ones(b)), (t1 - start, w.encoder_evals), (t2 - t1, evals)], b)
        infos = [
            PurifyInfo(t=float(t), steps=int(s), denoiser_evals=int(d), encoder_evals=int(c), converged=bool(v),
                       seconds=sec)
            for t, s, d, c, v, sec in zip(
                t_kept.tolist(), w.moves.tolist(), evals.tolist(), w.encoder_evals.tolist(),
                w.converged.tolist(), secs, strict=True,
            )
        ]
        log.debug("DiffCAP stopping steps %s, converged %s", w.moves.tolist(), w.converged.tolist())
        return y, infos
