"""The task-agnostic contract every vision-language model adapter follows.

Images enter as float tensors in [0, 1], shape (B, 3, R, R) with R = ``resolution``; the adapter normalises
internally, exactly once, so an L-infinity eps means the same thing for every model. Any geometric
preprocessing (LLaVA's pad-to-square, a centre crop) happens in ``to_pixels``, before an attack, so the
attacker's eps-ball is over the very tensor the model sees.

Models know nothing about tasks: a task builds prompt strings with ``format_prompt`` (the model's own chat
framing of a list of ``Turn``), then calls ``generate`` / ``loss`` / ``zero_shot_logits``. A model lists
what it can do in ``capabilities``; ``family`` names the prompt templates a task config holds for it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from evaluators.errors import HarnessError

#: everything a model may be able to do
CAPABILITIES = frozenset({"generate", "loss", "embed", "zero_shot"})
#: what each task needs from a model
TASK_NEEDS: dict[str, frozenset[str]] = {
    "captioning": frozenset({"generate", "loss"}),
    "vqa": frozenset({"generate", "loss"}),
    "classification": frozenset({"zero_shot"}),
}


class CheckpointError(HarnessError):
    """A model folder or file is missing or incomplete; the message names the config key and what it needs."""


@dataclass(frozen=True)
class Turn:
    """One exchange of a prompt: the user's text (with the image in front of it when ``image``) and, for
    demonstrations or a loss target's context, the assistant's reply."""

    user: str
    assistant: str | None = None
    image: bool = True


class _TasksOf:
    """``VLM.tasks`` on the class or an instance: the tasks whose needs ``capabilities`` covers."""

    def __get__(self, obj: object, owner: type) -> tuple[str, ...]:
        caps = (owner if obj is None else obj).capabilities
        return tuple(t for t, need in TASK_NEEDS.items() if need <= caps)


class VLM(nn.Module, ABC):
    """Base class of the tiny models and the real VLMs (LLaVA, OpenFlamingo, CLIP)."""

    #: side of the square pixel input the model sees (pixels in [0, 1])
    resolution: int
    #: key of the prompt templates in task configs: "llava" | "openflamingo" | "clip"
    family: str
    #: subset of CAPABILITIES
    capabilities: frozenset[str] = frozenset()

    #: task names whose needs (``TASK_NEEDS``) the capabilities cover; readable on the class (no weights loaded)
    tasks = _TasksOf()

    def to_pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images -> (B, 3, R, R) floats in [0, 1] at the model's resolution, not normalised.
        Default: a plain (stretching) bicubic resize; adapters override it with their own geometry."""
        from evaluators.vlms.pixels import resize_square

        return torch.stack([resize_square(im, self.resolution) for im in images])

    @abstractmethod
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D) L2-normalised image embedding (DiffCAP's phi), differentiable in x."""

    def format_prompt(self, turns: Sequence[Turn]) -> str:
        """The model's own framing of ``turns`` (chat template, image tokens), as the string ``generate``
        and ``loss`` take."""
        raise self._unsupported("format_prompt")

    def generate(self, x: torch.Tensor, prompts: Sequence[str], **decoding: Any) -> list[str]:
        """One completion per (image, prompt); ``decoding``: max_new_tokens, num_beams, length_penalty, ..."""
        raise self._unsupported("generate")

    def loss(self, x: torch.Tensor, prompts: Sequence[str], targets: Sequence[str]) -> torch.Tensor:
        """(B,) per-sample mean cross-entropy of the target tokens only (the prompt's are masked), with the
        target appended to the prompt as the model would produce it; differentiable in x."""
        raise self._unsupported("loss")

    def zero_shot_logits(self, x: torch.Tensor, classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
        """(B, C) = logit scale x normalised image features @ class embeddings; differentiable in x."""
        raise self._unsupported("zero_shot_logits")

    def _unsupported(self, what: str) -> HarnessError:
        return HarnessError(f"{type(self).__name__} (family {getattr(self, 'family', '?')}) has no {what}; "
                            f"it can do {sorted(self.capabilities)}")


def check_batch(x: torch.Tensor, resolution: int, *lists: Sequence[Any]) -> None:
    """Shape checks shared by adapters: images (B, 3, R, R) and one entry per image in every list."""
    if x.ndim != 4 or x.shape[1] != 3 or x.shape[2] != resolution or x.shape[3] != resolution:
        raise ValueError(f"expected images (B, 3, {resolution}, {resolution}), got {tuple(x.shape)}")
    for seq in lists:
        if len(seq) != x.shape[0]:
            raise ValueError(f"{x.shape[0]} images but {len(seq)} prompts/targets")


class TokenIds:
    """The token ids of a text, memoised: an attack's loss tokenises the same prompts and targets at every step,
    and a text's ids depend only on the text and the adapter's tokenizer, fixed once loaded. ``encode`` maps one
    text to its ids; the ids come back as a tuple, so no caller can change what the memo holds. ``maxsize`` bounds
    the memory (a LLaVA prompt is ~600 ids with its image tokens): one attack batch's texts (images x targets plus
    the prompts) must fit, older ones are forgotten first."""

    def __init__(self, encode: Callable[[str], Sequence[int]], maxsize: int = 1024) -> None:
        if maxsize < 1:
            raise ValueError(f"maxsize must be at least 1, got {maxsize}")
        self.encode, self.maxsize = encode, int(maxsize)
        self._memo: dict[str, tuple[int, ...]] = {}

    def __call__(self, text: str) -> tuple[int, ...]:
        ids = self._memo.get(text)
        if ids is None:
            ids = tuple(int(i) for i in self.encode(text))
            if len(self._memo) >= self.maxsize:  # forget the oldest text
                del self._memo[next(iter(self._memo))]
            self._memo[text] = ids
        return ids


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, left: bool,
              device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), each (B, longest): the sequences padded with ``pad_id`` on the left (generation
    continues every row from its last column) or on the right (losses)."""
    t = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t), int(pad_id), dtype=torch.long)
    mask = torch.zeros(len(seqs), t, dtype=torch.long)
    for i, s in enumerate(seqs):
        cols = slice(t - len(s), t) if left else slice(0, len(s))
        ids[i, cols] = torch.tensor(list(s), dtype=torch.long)
        mask[i, cols] = 1
    return ids.to(device), mask.to(device)


class ClassEmbeddings:
    """Zero-shot class embeddings, cached per (classnames, templates): per class, the normalised mean of its
    normalised template embeddings (CLIP's recipe). ``encode_text`` maps strings to (N, D) features; it is called on
    chunks of ``chunk`` texts (ImageNet's 1000 classes x 80 templates in one batch would need tens of GB of
    activations, and each chunk pads only to its own longest text)."""

    def __init__(self, chunk: int = 1024) -> None:
        if chunk < 1:
            raise ValueError(f"chunk must be at least 1, got {chunk}")
        self.chunk = int(chunk)
        self._cache: dict[tuple[Any, ...], torch.Tensor] = {}

    def __call__(self, encode_text: Callable[[list[str]], torch.Tensor], classnames: Sequence[str],
                 templates: Sequence[str], device: torch.device | None = None) -> torch.Tensor:
        if not classnames or not templates:
            raise ValueError("zero-shot classification needs class names and at least one template")
        key = (tuple(classnames), tuple(templates), device)
        if key not in self._cache:
            texts = [tpl.format(c) for c in classnames for tpl in templates]
            with torch.no_grad():
                e = torch.cat([F.normalize(encode_text(texts[i:i + self.chunk]).float(), dim=-1)
                               for i in range(0, len(texts), self.chunk)])
                e = F.normalize(e.view(len(classnames), len(templates), -1).mean(1), dim=-1)
            self._cache[key] = e
        return self._cache[key]


#: the name this contract had before it became task-agnostic
VLMAdapter = VLM
