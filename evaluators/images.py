"""Images from disk to 8-bit RGB, with every failure turned into that sample's error."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)


def to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode. PIL's own ``convert("RGB")`` clips 16- and 32-bit grey levels at 255 (a 16-bit
    PNG turns white), so those are rescaled from their full range first; float images are taken as [0, 1] when
    they fit it, else as [0, 255]. Palette and alpha modes go through RGBA (alpha is dropped, as PIL does)."""
    if im.mode.startswith("I"):
        a = np.asarray(im, dtype=np.float64)
        top = float(a.max()) if a.size else 0.0
        if im.mode.startswith("I;16") or 255 < top <= 65535:
            a = a / 257.0  # 16-bit: 65535 -> 255
        elif top > 65535:
            a = a * (255.0 / top)
        im = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    elif im.mode == "F":
        a = np.nan_to_num(np.asarray(im, dtype=np.float64))
        a = a * 255.0 if a.size and a.max() <= 1.0 else a
        im = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    elif im.mode in ("P", "PA", "LA", "La", "RGBa"):
        im = im.convert("RGBA")
    return im.convert("RGB")


def load_images(paths: Sequence[str]) -> tuple[list[Image.Image | None], list[str | None]]:
    """Decode each image fully; any failure (missing, truncated, not an image, a decompression bomb, an
    unsupported mode) is that sample's error, never the run's."""
    images, errors = [], []
    for p in paths:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(p) as im:
                    im.load()
                    images.append(to_rgb(im))
            errors.append(None)
        except (Exception, Image.DecompressionBombWarning) as e:  # PIL raises many unrelated types
            why = " ".join(str(e).split())[:200] or type(e).__name__
            log.warning("skipping unreadable image %s: %s", p, why)
            images.append(None)
            errors.append(f"unreadable image {p}: {why}")
    return images, errors
