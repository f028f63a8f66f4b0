"""PIL image -> pixel tensor in [0, 1] at a model's input resolution (no normalisation: that happens in the
model wrapper, so the attacker's eps is in the same pixel units for every model)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def pad_to_square(img: Image.Image, fill: tuple[int, int, int] | None = None) -> Image.Image:
    """Pad the shorter side symmetrically (offset ``(side - w) // 2``, as LLaVA's ``expand2square``) with
    ``fill`` (LLaVA: 255 x the image processor's mean, truncated to int) or, when None, the image's own mean
    colour (for models without such a constant)."""
    img = img.convert("RGB")
    w, h = img.size
    if w == h:
        return img
    if fill is None:
        mean = tuple(int(round(v)) for v in np.asarray(img, dtype=np.float64).reshape(-1, 3).mean(axis=0))
    else:
        mean = tuple(int(v) for v in fill)
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), mean)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


def resize_square(img: Image.Image, size: int, pad: bool = False) -> torch.Tensor:
    """Float tensor (3, size, size) in [0, 1].

    ``pad=False`` stretches to a square (bicubic); ``pad=True`` first pads to a square with the mean colour,
    which keeps the aspect ratio, as LLaVA-1.5 does.
    """
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    img = pad_to_square(img) if pad else img.convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    arr = np.asarray(img, dtype=np.uint8).copy()
    return torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0)
