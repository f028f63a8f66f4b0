"""The shapes world's vocabulary and the sentences written about a scene: reference captions, VQA questions
and annotator answers (split from ``shapes``, which draws and renders the scenes and writes the files)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from evaluators.datasets.shapes import Scene, ShapeSpec

#: Shape types; the class labels are these names in sorted order (see ``CLASSNAMES``).
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon", "cross")
CLASSNAMES: tuple[str, ...] = tuple(sorted(SHAPES))
#: Named palette (RGB).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (35, 70, 225),
    "yellow": (245, 220, 30),
    "purple": (145, 45, 190),
    "orange": (250, 135, 20),
    "white": (250, 250, 250),
    "black": (12, 12, 12),
}
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")
BACKGROUNDS: tuple[str, ...] = ("stripes", "checker", "noise", "gradient")

# How the phrases read in captions and questions.
_POS_PHRASE = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
_POS_PHRASE_ALT = {
    "left": "on the left side",
    "right": "on the right side",
    "top": "near the top",
    "bottom": "near the bottom",
    "center": "in the middle",
}
_BG_PHRASE = {
    "stripes": ("striped background", "background of stripes"),
    "checker": ("checkered background", "checkerboard pattern"),
    "noise": ("noisy background", "speckled background"),
    "gradient": ("gradient background", "smoothly shaded background"),
}
_NUM_WORD = {1: "one", 2: "two", 3: "three"}


def _a(word: str) -> str:
    """Indefinite article for ``word``."""
    return ("an " if word[0] in "aeiou" else "a ") + word


def _others_phrase(others: list[ShapeSpec], with_pos: bool) -> str:
    parts = []
    for sp in others:
        p = f"{_a(sp.color)} {sp.shape}"
        if with_pos:
            p += " " + _POS_PHRASE[sp.position]
        parts.append(p)
    return " and ".join(parts)


def make_captions(scene: Scene, rng: np.random.Generator) -> list[str]:
    """Five different reference sentences (lowercase words only) drawn from ten templates."""
    m = scene.main
    others = list(scene.shapes[1:])
    n = len(scene.shapes)
    big = ("large", "big", "huge")[int(rng.integers(3))]
    bg0, bg1 = _BG_PHRASE[scene.background]
    pos, pos_alt = _POS_PHRASE[m.position], _POS_PHRASE_ALT[m.position]
    shape_word = "shape" if n == 1 else "shapes"
    cands = [
        f"a {big} {m.color} {m.shape} {pos}" + (f" with {_others_phrase(others, True)}" if others else ""),
        f"{_a(m.color)} {m.shape} on a {bg0}",
        f"there is {_a(m.color)} {m.shape} {pos_alt} of the image",
        f"{_NUM_WORD[n]} {shape_word} on a {bg1}"
        + (f" the biggest is {_a(m.color)} {m.shape}" if others else f" {_a(m.color)} {m.shape}"),
        f"the picture shows a {big} {m.color} {m.shape}"
        + (f" next to {_others_phrase(others, False)}" if others else " and nothing else"),
        f"an image of {_a(m.color)} {m.shape} {pos} on a {bg0}",
        f"a {m.shape} colored {m.color}"
        + (" and a smaller " + " and a smaller ".join(o.shape for o in others) if others else " alone"),
        f"{m.color} {m.shape} {pos_alt} with a {bg1}",
        # two that leave the colour out, as real annotators often do
        f"a drawing with a {big} {m.shape}"
        + (f" and {_NUM_WORD[n - 1]} smaller {'shape' if n == 2 else 'shapes'}" if others else ""),
        (f"the largest shape is a {m.shape}" if others else f"the only shape is a {m.shape}") + f" {pos}",
    ]
    idx = rng.choice(len(cands), size=5, replace=False)
    return [" ".join(cands[int(i)].split()) for i in idx]


def _variants(answer: str, answer_type: str) -> list[str]:
    """Plausible ways annotators type the same answer (the VQA normalisation maps most back)."""
    if answer_type == "number":
        word = _NUM_WORD.get(int(answer), answer)
        return [word, answer + ".", word.capitalize()]
    if answer_type == "yes/no":
        return [answer + ".", answer.capitalize(), answer + "!"]
    if answer in COLORS:
        return [answer + ".", answer.capitalize(), answer + " color"]
    return ["a " + answer, answer + ".", answer.capitalize(), "the " + answer]


def _wrong(answer: str, answer_type: str, rng: np.random.Generator) -> str:
    if answer_type == "number":
        pool = [str(k) for k in (1, 2, 3, 4)]
    elif answer_type == "yes/no":
        pool = ["yes", "no"]
    elif answer in COLORS:
        pool = list(COLORS)
    else:
        pool = list(SHAPES)
    pool = [p for p in pool if p != answer]
    return pool[int(rng.integers(len(pool)))]


def make_answers(truth: str, answer_type: str, rng: np.random.Generator) -> list[str]:
    """Ten annotator answers: mostly the truth, some spelling variants, occasionally a wrong one."""
    out = []
    variants = _variants(truth, answer_type)
    for _ in range(10):
        u = rng.uniform()
        if u < 0.7:
            out.append(truth)
        elif u < 0.92:
            out.append(variants[int(rng.integers(len(variants)))])
        else:
            out.append(_wrong(truth, answer_type, rng))
    # The majority must stay the truth, as with real annotators on an unambiguous image.
    if out.count(truth) < 4:
        out[:4] = [truth] * 4
    return out


def make_questions(scene: Scene, rng: np.random.Generator) -> list[tuple[str, str, str, str]]:
    """2 to 4 questions as (question, answer, question_type, answer_type)."""
    shapes = scene.shapes
    pool: list[tuple[str, str, str, str]] = []
    sp = shapes[int(rng.integers(len(shapes)))]
    pool.append((f"What color is the {sp.shape}?", sp.color, "what color is the", "other"))
    sp = shapes[int(rng.integers(len(shapes)))]
    pool.append((f"What shape is {_POS_PHRASE[sp.position]}?", sp.shape, "what shape is", "other"))
    pool.append(("How many shapes are there?", str(len(shapes)), "how many", "number"))
    present = {(s.color, s.shape) for s in shapes}
    if rng.uniform() < 0.5:
        sp = shapes[int(rng.integers(len(shapes)))]
        pool.append((f"Is there {_a(sp.color)} {sp.shape}?", "yes", "is there", "yes/no"))
    else:
        while True:
            c = list(COLORS)[int(rng.integers(len(COLORS)))]
            s = SHAPES[int(rng.integers(len(SHAPES)))]
            if (c, s) not in present:
                break
        pool.append((f"Is there {_a(c)} {s}?", "no", "is there", "yes/no"))
    k = int(rng.integers(2, 5))
    idx = sorted(int(i) for i in rng.choice(len(pool), size=k, replace=False))
    return [pool[i] for i in idx]
