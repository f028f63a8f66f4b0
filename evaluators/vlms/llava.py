"""LLaVA-1.5 through transformers' ``LlavaForConditionalGeneration``, from a folder in the llava-hf layout
(``llava-hf/llava-1.5-7b-hf``: config.json, weights, tokenizer, preprocessor_config.json, chat template).

- Pixels: ``to_pixels`` does the geometry before any attack. ``preprocess="pad"`` (default) pads to a square
  with 255 x the image processor's mean colour, as LLaVA-1.5's own evaluation does (``expand2square``), then
  lets the processor resize; ``"crop"`` is the processor's own resize + centre crop. Either way the result is
  the processor's output before normalisation, so the attack's eps-ball is over the 336 px tensor the model
  sees; normalisation (the processor's mean/std) happens once, inside ``_pixel_values``.
- Prompts: the processor's chat template (``USER: <image>\\n{text} ASSISTANT:``); ``<image>`` is expanded to
  as many image tokens as the vision tower yields, as the processor does.
- ``loss``: cross-entropy of the target tokens only, the target appended as the model would answer:
  ``prompt + " " + target`` then ``</s>``.
- ``generate``: greedy by default (``do_sample=False``), batched with left padding.
- ``embed`` (DiffCAP's phi, config ``vlm.embed``): ``"pooled"`` (default) is the vision tower's pooled CLS
  output (post-layernorm); ``"tokens"`` is the mean of the projected image tokens the language model reads.
- ``gradient_checkpointing``: recompute the layers in the backward pass of ``loss`` (attacks); generation
  never uses it (transformers drops the KV cache under checkpointing).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from evaluators.errors import ConfigError
from evaluators.vlms.base import VLM, CheckpointError, TokenIds, Turn, check_batch, pad_batch
from evaluators.vlms.checkpoints import (
    HF_WEIGHTS,
    has_chat_template,
    parse_dtype,
    read_config,
    require_files,
    resolve_folder,
)
from evaluators.vlms.pixels import pad_to_square

log = logging.getLogger(__name__)

KEY = "vlm.path"
LAYOUT = "llava-hf (like llava-hf/llava-1.5-7b-hf)"
PREPROCESS = ("pad", "crop")
EMBED = ("pooled", "tokens")


def check_llava_folder(path: str | Path) -> Path:
    """The folder of ``path`` if it holds a llava-hf checkpoint; else one-line ``CheckpointError``."""
    folder = resolve_folder(path, KEY, LAYOUT)
    require_files(folder, KEY, [("config.json", ["config.json"]), ("the weights", HF_WEIGHTS),
                                ("the tokenizer", ["tokenizer.json", "tokenizer.model"]),
                                ("the image processor config", ["preprocessor_config.json"])])
    read_config(folder, KEY, ["llava"], LAYOUT)
    if not has_chat_template(folder):
        raise CheckpointError(f"{KEY}={folder} is incomplete: it lacks the chat template (chat_template.json or "
                              "chat_template.jinja)")
    return folder


class LlavaVLM(VLM):
    """LLaVA-1.5 (or any llava-hf checkpoint) behind the task-agnostic contract."""

    family = "llava"
    capabilities = frozenset({"generate", "loss", "embed"})

    def __init__(self, model: Any, processor: Any, preprocess: str = "pad", embed: str = "pooled",
                 gradient_checkpointing: bool = False):
        super().__init__()
        if preprocess not in PREPROCESS:
            raise ConfigError(f"vlm.preprocess must be one of {PREPROCESS}, got {preprocess!r}")
        if embed not in EMBED:
            raise ConfigError(f"vlm.embed must be one of {EMBED}, got {embed!r}")
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.preprocess = preprocess
        self.embed_kind = embed
        ip = processor.image_processor
        crop = getattr(ip, "crop_size", None) or {}
        self.resolution = int(crop.get("height") or ip.size.get("shortest_edge"))
        vc = model.config.vision_config
        if self.resolution != vc.image_size:
            raise CheckpointError(f"{KEY}: the image processor makes {self.resolution} px images but the vision "
                                  f"tower expects {vc.image_size} px")
        self.fill = tuple(int(255 * m) for m in ip.image_mean)
        self.register_buffer("mean", torch.tensor(ip.image_mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(ip.image_std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.image_token = processor.image_token
        full = model.config.vision_feature_select_strategy == "full"
        self.n_image_tokens = (vc.image_size // vc.patch_size) ** 2 + int(full)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self._token_ids = TokenIds(self._tokenize)
        self.gradient_checkpointing = bool(gradient_checkpointing)
        if self.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: str = "float16", preprocess: str = "pad",
                        embed: str = "pooled", gradient_checkpointing: bool = False,
                        trust_remote_code: bool = False, resolution: int | None = None,
                        device: str | torch.device = "cpu") -> LlavaVLM:
        """Load from a llava-hf folder (or a hub id already in the local cache); files are checked first.
        ``resolution`` (config ``vlm.resolution``), when given, must be the checkpoint's."""
        if preprocess not in PREPROCESS:
            raise ConfigError(f"vlm.preprocess must be one of {PREPROCESS}, got {preprocess!r}")
        if embed not in EMBED:
            raise ConfigError(f"vlm.embed must be one of {EMBED}, got {embed!r}")
        torch_dtype = parse_dtype(dtype, "vlm.dtype")
        folder = check_llava_folder(path)
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration.from_pretrained(
            folder, dtype=torch_dtype, local_files_only=True, trust_remote_code=bool(trust_remote_code))
        processor = AutoProcessor.from_pretrained(folder, local_files_only=True, use_fast=False,
                                                  trust_remote_code=bool(trust_remote_code))
        model.eval().requires_grad_(False)
        vlm = cls(model, processor, preprocess, embed, gradient_checkpointing)
        if resolution is not None and int(resolution) != vlm.resolution:
            raise ConfigError(f"vlm.resolution={resolution} but the checkpoint at {KEY}={path} takes "
                              f"{vlm.resolution} px images; set vlm.resolution={vlm.resolution}")
        return vlm.to(device)

    # ------------------------------------------------------------------------------------------ pixels

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def to_pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """The processor's resized (and, for "crop", centre-cropped) images in [0, 1], not normalised; for
        "pad" the image is first padded to a square with the processor's mean colour."""
        ims = [im.convert("RGB") for im in images]
        if self.preprocess == "pad":
            ims = [pad_to_square(im, self.fill) for im in ims]
        out = self.processor.image_processor(ims, do_normalize=False, return_tensors="pt")["pixel_values"]
        return out.float().clamp(0, 1)

    def _pixel_values(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels in [0, 1] -> the model's normalised input (the only place normalisation happens)."""
        check_batch(x, self.resolution)
        x = x.to(device=self.device, dtype=self._compute_dtype)
        return ((x - self.mean.to(x.dtype)) / self.std.to(x.dtype)).to(self.dtype)

    @property
    def _compute_dtype(self) -> torch.dtype:
        """float32, or float64 for a float64 model (gradient checks): the precision of losses and embeddings."""
        return torch.promote_types(self.dtype, torch.float32)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        pv = self._pixel_values(x)
        if self.embed_kind == "pooled":
            feats = self.model.model.vision_tower(pv).pooler_output
        else:
            feats = self._image_features(pv).mean(1)
        return F.normalize(feats.to(self._compute_dtype), dim=-1)

    def _image_features(self, pv: torch.Tensor) -> torch.Tensor:
        out = self.model.get_image_features(pixel_values=pv)
        return out if isinstance(out, torch.Tensor) else torch.stack(list(out))

    # ------------------------------------------------------------------------------------------ text

    def format_prompt(self, turns: Sequence[Turn]) -> str:
        """The processor's chat template over the turns (ends with "ASSISTANT:" when the last turn is open)."""
        if sum(t.image for t in turns) != 1:
            raise ValueError(f"LLaVA-1.5 prompts take exactly one image; got {sum(t.image for t in turns)}")
        conversation: list[dict[str, Any]] = []
        for t in turns:
            content: list[dict[str, Any]] = [{"type": "image"}] if t.image else []
            content.append({"type": "text", "text": t.user})
            conversation.append({"role": "user", "content": content})
            if t.assistant is not None:
                conversation.append({"role": "assistant", "content": [{"type": "text", "text": t.assistant}]})
        open_turn = turns[-1].assistant is None
        # older llava-hf revisions keep the template in tokenizer_config.json only
        template = self.processor.chat_template or self.tokenizer.chat_template
        return self.processor.apply_chat_template(conversation, chat_template=template, add_generation_prompt=open_turn)

    def _tokenize(self, text: str) -> list[int]:
        if text.count(self.image_token) != 1:
            raise ValueError(f"a LLaVA prompt must hold exactly one {self.image_token}: {text!r}")
        expanded = text.replace(self.image_token, self.image_token * self.n_image_tokens)
        return list(self.tokenizer(expanded, add_special_tokens=True)["input_ids"])

    def _encode(self, text: str) -> list[int]:
        """The ids of a prompt (``<image>`` expanded to the image tokens), memoised (``TokenIds``)."""
        return list(self._token_ids(text))

    def _batch(self, seqs: list[list[int]], left: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return pad_batch(seqs, int(self.tokenizer.pad_token_id), left, self.device)

    def target_ids(self, prompt: str, target: str) -> tuple[list[int], int]:
        """(ids of prompt + " " + target + </s>, number of prompt ids): the target as the model answers it."""
        p_ids = self._encode(prompt)
        full = self._encode(f"{prompt} {target}")
        if full[: len(p_ids)] != p_ids:
            raise ValueError(f"the tokenizer merges the prompt's end with the target {target!r}")
        return full + [int(self.tokenizer.eos_token_id)], len(p_ids)

    @contextlib.contextmanager
    def _checkpointing(self) -> Iterator[None]:
        """Turn on transformers' per-layer checkpointing (it runs only in training mode) for one forward."""
        if not (self.gradient_checkpointing and torch.is_grad_enabled()):
            yield
            return
        from transformers.modeling_layers import GradientCheckpointingLayer

        layers = [m for m in self.model.modules() if isinstance(m, GradientCheckpointingLayer)]
        for m in layers:
            m.training = True  # the layer only: its dropouts stay in eval mode
        try:
            yield
        finally:
            for m in layers:
                m.training = False

    def loss(self, x: torch.Tensor, prompts: Sequence[str], targets: Sequence[str]) -> torch.Tensor:
        check_batch(x, self.resolution, prompts, targets)
        pairs = [self.target_ids(p, t) for p, t in zip(prompts, targets, strict=True)]
        ids, mask = self._batch([s for s, _ in pairs], left=False)
        tmask = torch.zeros_like(mask, dtype=torch.bool)
        for i, (s, n_prompt) in enumerate(pairs):
            tmask[i, n_prompt : len(s)] = True
        with self._checkpointing():
            logits = self.model(input_ids=ids, attention_mask=mask, pixel_values=self._pixel_values(x),
                                use_cache=False).logits
        # the token at position j is predicted from position j - 1
        ce = F.cross_entropy(logits[:, :-1].to(self._compute_dtype).transpose(1, 2), ids[:, 1:], reduction="none")
        m = tmask[:, 1:].to(ce.dtype)
        return (ce * m).sum(1) / m.sum(1)

    @torch.no_grad()
    def generate(self, x: torch.Tensor, prompts: Sequence[str], **decoding: Any) -> list[str]:
        check_batch(x, self.resolution, prompts)
        ids, mask = self._batch([self._encode(p) for p in prompts], left=True)
        decoding.setdefault("do_sample", False)
        out = self.model.generate(input_ids=ids, attention_mask=mask, pixel_values=self._pixel_values(x),
                                  pad_token_id=int(self.tokenizer.pad_token_id), **decoding)
        texts = self.tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
        return [t.strip() for t in texts]
