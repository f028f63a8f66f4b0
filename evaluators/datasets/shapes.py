"""The embedded "shapes" world: a small synthetic data set written in the real data sets' file formats.

Why: no real data set can be downloaded here, yet every loader, task, attack and defense of the harness
must run end to end on something whose labels, captions and answers are known exactly. Each image shows
1 to 3 coloured shapes on a textured background; the single largest shape (the "main" shape) gives the
class label. The generator writes, under ``root``:

- ``images/shapes_{imgid:05d}.png``
- ``dataset_shapes.json`` (Karpathy split file, 5 sentences per image)
- ``captions_shapes.json`` (COCO-style caption references, like ``captions_val2014.json``)
- ``vqa/questions_{split}.json`` and ``vqa/annotations_{split}.json`` (VQAv2 style, 10 answers each)
- ``classes/{split}/{classname}/shapes_{imgid:05d}.png`` (ImageFolder copies) and ``classes/classnames.txt``
- ``scenes_shapes.json`` (the exact scene of every image: shapes, colours, positions, background)
- ``DONE`` (written last; holds the parameters, so a second call with the same ones returns at once)

Everything is a deterministic function of the parameters (one ``numpy.random.Generator`` per image).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from evaluators.datasets.shapes_language import (  # noqa: F401  (the world's vocabulary, re-exported)
    BACKGROUNDS,
    CLASSNAMES,
    COLORS,
    POSITIONS,
    SHAPES,
    make_answers,
    make_captions,
    make_questions,
)

log = logging.getLogger(__name__)

_POS_OFFSET = {"left": (-1, 0), "right": (1, 0), "top": (0, -1), "bottom": (0, 1), "center": (0, 0)}
_FORMAT_VERSION = 2


@dataclass(frozen=True)
class ShapeSpec:
    """One drawn shape: type, colour name, position name, radius in pixels, rotation in degrees."""

    shape: str
    color: str
    position: str
    radius: float
    angle: float
    dx: float
    dy: float


@dataclass(frozen=True)
class Scene:
    """Everything that is true about one image. ``shapes[0]`` is the main (largest) shape."""

    imgid: int
    split: str
    background: str
    shapes: tuple[ShapeSpec, ...]

    @property
    def main(self) -> ShapeSpec:
        return self.shapes[0]

    @property
    def label(self) -> int:
        return CLASSNAMES.index(self.main.shape)


# --------------------------------------------------------------------------------------------- scenes


def _sample_scene(rng: np.random.Generator, imgid: int, split: str, size: int) -> Scene:
    n = int(rng.choice([1, 2, 3], p=[0.25, 0.4, 0.35]))
    kinds = rng.choice(len(SHAPES), size=n, replace=False)
    cols = rng.choice(len(COLORS), size=n, replace=False)
    poss = rng.choice(len(POSITIONS), size=n, replace=False)
    color_names = list(COLORS)
    specs = []
    for k in range(n):
        rel = rng.uniform(0.17, 0.2) if k == 0 else rng.uniform(0.08, 0.11)
        specs.append(
            ShapeSpec(
                shape=SHAPES[int(kinds[k])],
                color=color_names[int(cols[k])],
                position=POSITIONS[int(poss[k])],
                radius=float(rel * size),
                angle=float(rng.uniform(-15, 15)),
                dx=float(rng.uniform(-0.02, 0.02) * size),
                dy=float(rng.uniform(-0.02, 0.02) * size),
            )
        )
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    return Scene(imgid=imgid, split=split, background=background, shapes=tuple(specs))


# -------------------------------------------------------------------------------------------- drawing


def _muted_color(rng: np.random.Generator) -> np.ndarray:
    """A desaturated mid-tone, so that every palette colour (white and black included) stands out."""
    grey = rng.uniform(95, 165)
    tint = rng.uniform(-30, 30, size=3)
    return np.clip(grey + tint, 0, 255)


def _background(rng: np.random.Generator, kind: str, size: int) -> np.ndarray:
    c1, c2 = _muted_color(rng), _muted_color(rng)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    if kind == "stripes":
        period = rng.uniform(4, 10)
        theta = rng.choice([0.0, np.pi / 2, np.pi / 4, -np.pi / 4])
        phase = (xx * np.cos(theta) + yy * np.sin(theta)) / period
        w = (np.floor(phase) % 2)[..., None]
    elif kind == "checker":
        cell = int(rng.integers(4, 12))
        w = (((xx // cell) + (yy // cell)) % 2)[..., None]
    elif kind == "noise":
        w = rng.uniform(0, 1, size=(size, size, 1))
    else:  # gradient
        theta = rng.uniform(0, 2 * np.pi)
        proj = (xx - size / 2) * np.cos(theta) + (yy - size / 2) * np.sin(theta)
        w = ((proj - proj.min()) / max(float(np.ptp(proj)), 1e-6))[..., None]
    img = c1 * (1 - w) + c2 * w
    return np.clip(img, 0, 255).astype(np.uint8)


def _polygon(shape: str, cx: float, cy: float, r: float, angle_deg: float) -> list[tuple[float, float]]:
    if shape == "square":
        h = 0.85 * r
        pts = [(-h, -h), (h, -h), (h, h), (-h, h)]
    elif shape == "triangle":
        pts = [(r * np.cos(a), r * np.sin(a)) for a in np.deg2rad([-90, 30, 150])]
    elif shape == "hexagon":
        pts = [(r * np.cos(a), r * np.sin(a)) for a in np.deg2rad(np.arange(0, 360, 60))]
    elif shape == "star":
        pts = []
        for i in range(10):
            rad = r if i % 2 == 0 else 0.45 * r
            a = np.deg2rad(-90 + 36 * i)
            pts.append((rad * np.cos(a), rad * np.sin(a)))
    elif shape == "cross":
        a, b = 0.33 * r, 0.95 * r
        pts = [
            (-a, -b),
            (a, -b),
            (a, -a),
            (b, -a),
            (b, a),
            (a, a),
            (a, b),
            (-a, b),
            (-a, a),
            (-b, a),
            (-b, -a),
            (-a, -a),
        ]
    else:
        raise ValueError(f"not a polygon shape: {shape}")
    t = np.deg2rad(angle_deg)
    c, s = np.cos(t), np.sin(t)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]


def render_scene(scene: Scene, size: int, rng: np.random.Generator) -> Image.Image:
    """Draw one scene: textured background, then the shapes (main first), anti-aliased by 4x supersampling."""
    bg = Image.fromarray(_background(rng, scene.background, size), "RGB").convert("RGBA")
    ss = 4
    layer = Image.new("RGBA", (size * ss, size * ss), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    offset = 0.31 * size
    for sp in scene.shapes:
        ox, oy = _POS_OFFSET[sp.position]
        cx = (size / 2 + ox * offset + sp.dx) * ss
        cy = (size / 2 + oy * offset + sp.dy) * ss
        r = sp.radius * ss
        fill = COLORS[sp.color] + (255,)
        if sp.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            draw.polygon(_polygon(sp.shape, cx, cy, r, sp.angle), fill=fill)
    layer = layer.resize((size, size), Image.Resampling.BOX)
    return Image.alpha_composite(bg, layer).convert("RGB")


# ------------------------------------------------------------------------------------------ top level


def _params(n_train: int, n_test: int, size: int, seed: int) -> dict[str, int]:
    return {"n_train": n_train, "n_test": n_test, "size": size, "seed": seed, "format": _FORMAT_VERSION}


def is_generated(
    root: str | Path, n_train: int = 4000, n_test: int = 500, size: int = 64, seed: int = 0
) -> bool:
    """True when ``root`` holds a complete shapes world made with these parameters."""
    marker = Path(root) / "DONE"
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()) == _params(n_train, n_test, size, seed)
    except json.JSONDecodeError:
        return False


def _dump(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, separators=(",", ":")))


def generate_shapes(
    root: str | Path, n_train: int = 4000, n_test: int = 500, size: int = 64, seed: int = 0
) -> Path:
    """Write the shapes world under ``root`` and return ``root``.

    Idempotent: if ``root/DONE`` records the same parameters, nothing is redone. Otherwise the generator's
    own outputs (``images/shapes_*.png``, ``classes/``, ``vqa/``, the json files) are replaced.
    """
    root = Path(root)
    if is_generated(root, n_train, n_test, size, seed):
        log.info("shapes world already at %s", root)
        return root
    if n_train < 0 or n_test < 0 or n_train + n_test == 0:
        raise ValueError(f"need n_train, n_test >= 0 and at least one image, got {n_train}, {n_test}")
    if size < 16:
        raise ValueError(f"size must be at least 16 pixels, got {size}")
    (root / "DONE").unlink(missing_ok=True)
    img_dir = root / "images"
    for old in img_dir.glob("shapes_*.png") if img_dir.is_dir() else []:
        old.unlink()
    for sub in ("classes", "vqa"):
        if (root / sub).is_dir():
            shutil.rmtree(root / sub)
    img_dir.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        for c in CLASSNAMES:
            (root / "classes" / split / c).mkdir(parents=True, exist_ok=True)

    seeds = np.random.SeedSequence(seed).spawn(n_train + n_test)
    karpathy: list[dict[str, Any]] = []
    coco_images: list[dict[str, Any]] = []
    coco_anns: list[dict[str, Any]] = []
    questions: dict[str, list[dict[str, Any]]] = {"train": [], "test": []}
    annotations: dict[str, list[dict[str, Any]]] = {"train": [], "test": []}
    scenes: list[dict[str, Any]] = []
    for imgid in range(n_train + n_test):
        split = "train" if imgid < n_train else "test"
        rng = np.random.default_rng(seeds[imgid])
        scene = _sample_scene(rng, imgid, split, size)
        img = render_scene(scene, size, rng)
        fname = f"shapes_{imgid:05d}.png"
        img.save(img_dir / fname, format="PNG")
        shutil.copyfile(img_dir / fname, root / "classes" / split / scene.main.shape / fname)

        caps = make_captions(scene, rng)
        sentids = [imgid * 5 + j for j in range(5)]
        karpathy.append(
            {
                "filepath": "images",
                "filename": fname,
                "imgid": imgid,
                "cocoid": imgid,
                "split": split,
                "sentids": sentids,
                "sentences": [
                    {"raw": c, "tokens": c.split(), "imgid": imgid, "sentid": s}
                    for c, s in zip(caps, sentids, strict=True)
                ],
            }
        )
        coco_images.append({"id": imgid, "file_name": fname})
        coco_anns.extend(
            {"image_id": imgid, "id": s, "caption": c} for c, s in zip(caps, sentids, strict=True)
        )

        for k, (q, a, qtype, atype) in enumerate(make_questions(scene, rng)):
            qid = imgid * 1000 + k
            questions[split].append({"image_id": imgid, "question": q, "question_id": qid})
            answers = make_answers(a, atype, rng)
            annotations[split].append(
                {
                    "question_id": qid,
                    "image_id": imgid,
                    "question_type": qtype,
                    "answer_type": atype,
                    "multiple_choice_answer": a,
                    "answers": [
                        {"answer": ans, "answer_confidence": "yes", "answer_id": j + 1}
                        for j, ans in enumerate(answers)
                    ],
                }
            )
        scenes.append(
            {
                "imgid": imgid,
                "split": split,
                "background": scene.background,
                "label": scene.label,
                "shapes": [asdict(s) for s in scene.shapes],
            }
        )

    _dump(root / "dataset_shapes.json", {"dataset": "shapes", "images": karpathy})
    _dump(
        root / "captions_shapes.json",
        {
            "info": {"description": "shapes world"},
            "licenses": [],
            "images": coco_images,
            "annotations": coco_anns,
        },
    )
    for split in ("train", "test"):
        common = {"info": {"description": "shapes world"}, "license": {}, "data_subtype": split}
        _dump(
            root / "vqa" / f"questions_{split}.json",
            {**common, "task_type": "Open-Ended", "data_type": "shapes", "questions": questions[split]},
        )
        _dump(
            root / "vqa" / f"annotations_{split}.json",
            {**common, "data_type": "shapes", "annotations": annotations[split]},
        )
    (root / "classes" / "classnames.txt").write_text("\n".join(CLASSNAMES) + "\n")
    _dump(root / "scenes_shapes.json", {"size": size, "classnames": list(CLASSNAMES), "scenes": scenes})
    (root / "DONE").write_text(json.dumps(_params(n_train, n_test, size, seed)))
    log.info("wrote shapes world (%d train, %d test, %d px) to %s", n_train, n_test, size, root)
    return root
