"""Denoiser backbones behind one interface: eps prediction at a continuous diffusion time t in [0, 1].

Why: the purifiers (DiffPure, DiffCAP) integrate the VP-SDE in continuous time, while the networks were
trained on discrete DDPM indices 0..999. This wrapper owns that conversion, so every purifier and every
backbone (the real guided-diffusion 256x256 model, the small shapes-world model) agree on it.

Time conversion, checked in NVlabs/DiffPure ``runners/diffpure_sde.py`` (``RevVPSDE._scale_timesteps``,
the same in ``diffpure_ode.py`` / ``diffpure_ldsde.py``): for the guided-diffusion score model the
continuous t is turned into ``(t.float() * N).long()`` with ``N = 1000``, i.e. ``floor(1000 t)``, an
integer index, NOT ``t * 999``. ``t * 999`` (a float) is score_sde's convention for DDPM-trained models
(``score_sde/models/utils.py`` ``get_score_fn``, ``labels = t * 999``), which DiffPure uses only for its
CIFAR-10 score_sde model. Both are offered (``time_scaling``); "floor" is the default. Two deliberate
departures from DiffPure's truncation, both confined to edge cases: the index is clamped to N - 1 (DiffPure
would pass 1000 at t = 1 exactly, a value never seen in training), and 1e-3 is added before flooring so
that grid times k / N held in float32 map to k, not k - 1.

Note the index convention: guided-diffusion's index i denotes the state after i + 1 forward steps
(``alphas_cumprod[i]``), i.e. t = (i + 1) / N, so floor(N t) is one step later than exact; this is
DiffPure's behaviour for its SDE runner and is kept there. ``predict(x, i)`` instead hands the network
guided-diffusion's index itself and also returns the learned-variance channels: that is what DiffPure's DDPM
runner does, and what ``diffcap.samplers.DDPMAncestral`` calls. The noise schedule is ``schedule``
(a ``diffcap.schedule.Schedule`` built from the config's betas).
"""

from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from diffcap import perf
from diffcap.base import check_flags
from diffcap.schedule import Schedule
from diffcap.unet import GUIDED_DIFFUSION_256_UNCOND_FLAGS, UNetModel

log = logging.getLogger(__name__)

TimeScaling = Literal["floor", "linear999"]

GUIDED_DIFFUSION_FILENAME = "256x256_diffusion_uncond.pt"
GUIDED_DIFFUSION_URL = (
    "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/256x256_diffusion_uncond.pt"
)
#: 552,814,086 parameters x 4 bytes; the exact file size and a sha256 are not published by OpenAI.
GUIDED_DIFFUSION_PARAMS = 552_814_086

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
# Diffusion-side flags a guided-diffusion config may carry besides the UNet's own.
_DIFFUSION_FLAGS = {"diffusion_steps", "noise_schedule", "time_scaling"}


class Denoiser(nn.Module):
    """eps-prediction network on images in [-1, 1] at ``resolution``.

    ``forward(x, t)``: x (B, 3, R, R) in [-1, 1], t the continuous diffusion time in [0, 1] (shape (B,)
    or a scalar); returns eps (B, 3, R, R) in float32 (the first 3 channels when the UNet also predicts
    the variance). The UNet sees the discrete index given by ``time_scaling`` (see the module docstring).
    """

    def __init__(
        self,
        unet: UNetModel,
        num_timesteps: int = 1000,
        time_scaling: TimeScaling = "floor",
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
    ) -> None:
        super().__init__()
        if time_scaling not in ("floor", "linear999"):
            raise ValueError(f"time_scaling must be 'floor' or 'linear999', got {time_scaling!r}")
        self.unet = unet
        self.resolution: int = unet.image_size
        self.num_timesteps = int(num_timesteps)
        self.time_scaling: TimeScaling = time_scaling
        self.beta_start = float(beta_start)
        self.beta_end = float(beta_end)
        self.autocast: torch.dtype | None = None
        self.channels_last = False
        self._compiled: Any = None

    def set_speed(self, autocast: str | None = None, channels_last: bool = False, compile: bool = False,
                  attention: str = "einsum") -> Denoiser:
        """Speed options (README "Performance"; the defaults are the original computation):
        ``autocast`` runs the UNet under ``torch.autocast`` in that precision (a precision change: outputs move
        within the tolerance the README states); ``channels_last`` stores conv weights and inputs NHWC;
        ``compile`` calls the UNet through ``torch.compile``; ``attention="sdpa"`` uses PyTorch's
        scaled-dot-product attention instead of guided-diffusion's einsum (the same function)."""
        check_flags("denoiser", channels_last=channels_last, compile=compile)
        self.autocast = perf.autocast_dtype(autocast, "denoiser.autocast")
        self.unet.set_attention(attention)
        self.channels_last = channels_last
        if channels_last:
            self.unet.to(memory_format=torch.channels_last)
        # kept out of the module tree, so state_dict and parameters stay the UNet's own
        object.__setattr__(self, "_compiled", torch.compile(self.unet) if compile else None)
        return self

    @property
    def learn_sigma(self) -> bool:
        return self.unet.learn_sigma

    @property
    def schedule(self) -> Schedule:
        """The noise schedule the network was trained on (samplers and purifiers read it from here)."""
        return Schedule.from_betas(self.beta_start, self.beta_end, self.num_timesteps)

    def discrete_timesteps(self, t: Tensor) -> Tensor:
        """Continuous t in [0, 1] -> the timestep values the UNet was trained on."""
        if torch.any(t < 0) or torch.any(t > 1):
            raise ValueError(f"t must lie in [0, 1], got min {t.min().item()} max {t.max().item()}")
        n = self.num_timesteps
        if self.time_scaling == "floor":
            # + 1e-3 index units: t = k / N stored in float32 can land just below k (e.g. k = 251);
            # truncating it as DiffPure does would then pick k - 1.
            return torch.floor(t.double() * n + 1e-3).long().clamp(0, n - 1)
        return t.float() * (n - 1)

    def _check_images(self, x: Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[-1] != self.resolution or x.shape[-2] != self.resolution:
            raise ValueError(
                f"expected images (B, 3, {self.resolution}, {self.resolution}), got {tuple(x.shape)}"
            )

    def predict(self, x: Tensor, index: Tensor) -> tuple[Tensor, Tensor | None]:
        """The network at guided-diffusion's discrete ``index`` (B,): eps and, with ``learn_sigma``, the
        variance channels (in [-1, 1], guided-diffusion's learned range); both float32."""
        self._check_images(x)
        index = torch.as_tensor(index, device=x.device)
        if index.shape != (x.shape[0],):
            raise ValueError(f"index must have shape ({x.shape[0]},), got {tuple(index.shape)}")
        x = x.float()
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        net = self._compiled if self._compiled is not None else self.unet
        with perf.autocast(x.device.type, self.autocast):
            out = net(x, index)
        out = out.float()
        return (out[:, :3], out[:, 3:]) if self.unet.learn_sigma else (out, None)

    def forward(self, x: Tensor, t: Tensor | float) -> Tensor:
        self._check_images(x)
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must be a scalar or have shape ({x.shape[0]},), got {tuple(t.shape)}")
        return self.predict(x, self.discrete_timesteps(t))[0]

    def config(self) -> dict[str, Any]:
        """Everything needed to rebuild this denoiser (written to config.json)."""
        return {
            "unet": dict(self.unet.flags),
            "num_timesteps": self.num_timesteps,
            "time_scaling": self.time_scaling,
            "noise_schedule": "linear",
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
            "resolution": self.resolution,
        }


def _resolve_dtype(dtype: torch.dtype | str | None, use_fp16: bool) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.float16 if use_fp16 and torch.cuda.is_available() else torch.float32
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)} or 'auto'") from None


def _finish(unet: UNetModel, torso_dtype: torch.dtype, device: str | torch.device | None) -> None:
    unet.float()
    if torso_dtype != torch.float32:
        unet.set_torso_dtype(torso_dtype)
    if device is not None:
        unet.to(device)
    unet.eval().requires_grad_(False)


def _check_state_dict(sd: Any, path: Path) -> dict[str, Tensor]:
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise ValueError(f"{path} is not a plain state dict of tensors (guided-diffusion saves one)")
    return sd


def load_guided_diffusion(
    path: str | Path,
    dtype: torch.dtype | str | None = "auto",
    device: str | torch.device | None = None,
    autocast: str | None = None,
    channels_last: bool = False,
    compile: bool = False,
    attention: str = "einsum",
    **flag_overrides: Any,
) -> Denoiser:
    """Load OpenAI guided-diffusion's ``256x256_diffusion_uncond.pt`` (or a file with other flags).

    ``flag_overrides`` replace guided-diffusion flags (``num_channels``, ``channel_mult``, ...), plus
    ``diffusion_steps`` and ``time_scaling``. ``dtype``: the torso precision; "auto" means float16 when
    the flags say ``use_fp16`` and CUDA is available (guided-diffusion's ``convert_to_fp16``), else
    float32. Parameters are frozen; gradients with respect to the input still flow. ``autocast``,
    ``channels_last``, ``compile``, ``attention``: speed options (``Denoiser.set_speed``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"guided-diffusion checkpoint missing: put {GUIDED_DIFFUSION_FILENAME} (about 2.2 GB, "
            f"{GUIDED_DIFFUSION_PARAMS:,} float32 parameters; exact byte size and sha256 unknown, none published) "
            f"at {path}; it is the release file of github.com/openai/guided-diffusion ({GUIDED_DIFFUSION_URL})"
        )
    flags = dict(GUIDED_DIFFUSION_256_UNCOND_FLAGS)
    unet_keys = set(inspect.signature(UNetModel.__init__).parameters) - {"self"}
    unknown = set(flag_overrides) - unet_keys - _DIFFUSION_FLAGS
    if unknown:
        raise TypeError(f"unknown guided-diffusion flags {sorted(unknown)}")
    if flag_overrides.get("noise_schedule", "linear") != "linear":
        raise ValueError("only the linear noise schedule is supported (the 256x256 model uses it)")
    num_timesteps = int(flag_overrides.pop("diffusion_steps", 1000))
    time_scaling = flag_overrides.pop("time_scaling", "floor")
    flag_overrides.pop("noise_schedule", None)
    flags.update(flag_overrides)

    sd = _check_state_dict(torch.load(path, map_location="cpu", weights_only=True), path)
    with torch.device("meta"):
        unet = UNetModel(**flags)
    unet.load_state_dict(sd, strict=True, assign=True)
    torso = _resolve_dtype(dtype, bool(flags.get("use_fp16", False)))
    _finish(unet, torso, device)
    log.info("loaded guided-diffusion UNet from %s (%d tensors, torso %s)", path, len(sd), torso)
    # The linear DDPM schedule of guided-diffusion (get_named_beta_schedule "linear") is defined for
    # 1000 steps as 1e-4..0.02 and rescaled by 1000 / steps otherwise.
    scale = 1000 / num_timesteps
    den = Denoiser(unet, num_timesteps, time_scaling, beta_start=1e-4 * scale, beta_end=0.02 * scale)
    return den.set_speed(autocast, channels_last, compile, attention)


def save_denoiser(denoiser: Denoiser, folder: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (float32) into ``folder``; returns the weights path."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = denoiser.config()
    if extra:
        cfg["extra"] = extra
    (folder / CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n")
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in denoiser.unet.state_dict().items()}
    weights = folder / WEIGHTS_NAME
    save_file(tensors, str(weights), metadata={"format": "pt"})
    return weights


def build_denoiser(config: dict[str, Any]) -> Denoiser:
    """A randomly initialised denoiser from a ``Denoiser.config()`` dictionary."""
    unet = UNetModel(**config["unet"])
    return Denoiser(
        unet,
        num_timesteps=config.get("num_timesteps", 1000),
        time_scaling=config.get("time_scaling", "floor"),
        beta_start=config.get("beta_start", 1e-4),
        beta_end=config.get("beta_end", 0.02),
    )


def load_shapes_denoiser(
    path: str | Path, dtype: torch.dtype | str | None = "float32", device: str | torch.device | None = None,
    autocast: str | None = None, channels_last: bool = False, compile: bool = False, attention: str = "einsum",
) -> Denoiser:
    """Load the small shapes-world denoiser: a folder with ``config.json`` + ``model.safetensors``; the speed
    options are ``Denoiser.set_speed``'s."""
    from safetensors.torch import load_file

    folder = Path(path)
    cfg_path, weights = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not cfg_path.is_file() or not weights.is_file():
        raise FileNotFoundError(
            f"shapes denoiser missing: expected {cfg_path} and {weights} (a few MB, committed under "
            "checkpoints/shapes_denoiser/, or made by scripts/train_shapes_denoiser.py --out FOLDER)"
        )
    config = json.loads(cfg_path.read_text())
    with torch.device("meta"):
        den = build_denoiser(config)
    den.unet.load_state_dict(load_file(str(weights)), strict=True, assign=True)
    _finish(den.unet, _resolve_dtype(dtype, False), device)
    log.info("loaded shapes denoiser from %s", folder)
    return den.set_speed(autocast, channels_last, compile, attention)


__all__ = [
    "Denoiser",
    "build_denoiser",
    "load_guided_diffusion",
    "load_shapes_denoiser",
    "save_denoiser",
]
