"""CLIP (ViT-B/32 in the paper) as a zero-shot classifier and as DiffCAP's phi, from either published format:

- transformers: a folder in the ``openai/clip-vit-base-patch32`` layout (config.json with model_type "clip",
  weights, tokenizer, preprocessor_config.json), config ``vlm.path``;
- open_clip: a model name (e.g. ``ViT-B-32``, or an open_clip model-config JSON file) plus a weights file
  (``vlm.open_clip.model``, ``vlm.open_clip.checkpoint``), the format robust encoders (TeCoA, FARE) are
  published in. open_clip's pretrained *tags* (``openai``) would download, so a file is required.

Pixels: ``to_pixels`` is the model's own preprocessing (shortest side to 224, bicubic, centre crop) without its
normalisation, which happens once inside the model. Zero-shot logits = ``logit_scale`` (100, as CLIP and
CLIP_benchmark use) x normalised image features @ class embeddings, each the normalised mean over the data
set's templates of the normalised text features. ``embed`` is the normalised projected image embedding (the
pooled CLS token through the projection), the only output offered: CLIP has no language model reading tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from evaluators.errors import ConfigError
from evaluators.vlms.base import VLM, CheckpointError, ClassEmbeddings, check_batch
from evaluators.vlms.checkpoints import HF_WEIGHTS, parse_dtype, read_config, require_files, resolve_folder

KEY = "vlm.path"
LAYOUT = "transformers CLIP (like openai/clip-vit-base-patch32)"


def check_clip_folder(path: str | Path) -> Path:
    """The folder of ``path`` if it holds a transformers CLIP checkpoint; else one-line ``CheckpointError``."""
    folder = resolve_folder(path, KEY, LAYOUT)
    require_files(folder, KEY, [("config.json", ["config.json"]), ("the weights", HF_WEIGHTS),
                                ("the tokenizer", ["tokenizer.json", "vocab.json"]),
                                ("the image processor config", ["preprocessor_config.json"])])
    read_config(folder, KEY, ["clip"], LAYOUT)
    return folder


def check_clip_files(path: str | Path | None = None, open_clip: Mapping[str, Any] | None = None) -> None:
    """The files ``CLIPVLM.load`` would read exist (config ``vlm.check``, run before anything heavy)."""
    oc = dict(open_clip or {})
    if oc.get("checkpoint"):
        if not Path(str(oc["checkpoint"])).expanduser().is_file():
            raise CheckpointError(f"vlm.open_clip.checkpoint={oc['checkpoint']}: no such file; give the open_clip "
                                  "weights file (a state dict, e.g. open_clip_pytorch_model.bin); pretrained tags "
                                  "such as 'openai' are not downloaded")
        model = str(oc.get("model") or "")
        if model.endswith(".json") and not Path(model).expanduser().is_file():
            raise CheckpointError(f"vlm.open_clip.model={model}: no such model-config file")
    elif path is not None:
        check_clip_folder(path)


class CLIPVLM(VLM):
    """A CLIP model behind the contract; built by ``from_pretrained`` (transformers) or ``from_open_clip``."""

    family = "clip"
    capabilities = frozenset({"embed", "zero_shot"})

    def __init__(self, model: nn.Module, encode_image: Callable[[torch.Tensor], torch.Tensor],
                 encode_text: Callable[[list[str]], torch.Tensor], geometry: Callable[[Image.Image], torch.Tensor],
                 mean: Sequence[float], std: Sequence[float], resolution: int, logit_scale: float = 100.0):
        """``encode_image``: normalised pixels -> projected features; ``geometry``: PIL -> (3, R, R) in [0, 1]."""
        super().__init__()
        self.model = model
        self._encode_image = encode_image
        self._encode_text = encode_text
        self._geometry = geometry
        self.resolution = int(resolution)
        self.logit_scale = float(logit_scale)
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self._classes = ClassEmbeddings()

    # ---------------------------------------------------------------------------------- constructors

    @classmethod
    def load(cls, path: str | Path | None = None, open_clip: Mapping[str, Any] | None = None, **kwargs: Any) -> CLIPVLM:
        """The config's entry point: the open_clip checkpoint when ``open_clip.checkpoint`` is set, else the
        transformers folder at ``path``."""
        oc = dict(open_clip or {})
        if oc.get("checkpoint"):
            return cls.from_open_clip(model=oc.get("model") or "ViT-B-32", checkpoint=oc["checkpoint"],
                                      force_quick_gelu=bool(oc.get("force_quick_gelu", True)), **kwargs)
        if path is None:
            raise ConfigError("set vlm.path (a transformers CLIP folder) or vlm.open_clip.checkpoint")
        return cls.from_pretrained(path, **kwargs)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: str = "float32", embed: str = "pooled",
                        logit_scale: float = 100.0, resolution: int | None = None,
                        trust_remote_code: bool = False) -> CLIPVLM:
        """From a folder in the ``openai/clip-vit-base-patch32`` layout (or such a hub id in the local cache)."""
        _check_embed(embed)
        torch_dtype = parse_dtype(dtype, "vlm.dtype")
        folder = check_clip_folder(path)
        from transformers import AutoProcessor, CLIPModel

        model = CLIPModel.from_pretrained(folder, dtype=torch_dtype, local_files_only=True,
                                          trust_remote_code=bool(trust_remote_code))
        processor = AutoProcessor.from_pretrained(folder, local_files_only=True, use_fast=False,
                                                  trust_remote_code=bool(trust_remote_code))
        model.eval().requires_grad_(False)
        ip, tok = processor.image_processor, processor.tokenizer
        max_len = int(model.config.text_config.max_position_embeddings)

        def encode_image(pv: torch.Tensor) -> torch.Tensor:
            return _tensor(model.get_image_features(pixel_values=pv))

        def encode_text(texts: list[str]) -> torch.Tensor:
            t = tok(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
            dev = next(model.parameters()).device
            return _tensor(model.get_text_features(input_ids=t["input_ids"].to(dev),
                                                   attention_mask=t["attention_mask"].to(dev)))

        def geometry(im: Image.Image) -> torch.Tensor:
            return ip(im.convert("RGB"), do_normalize=False, return_tensors="pt")["pixel_values"][0]

        crop = getattr(ip, "crop_size", None) or {}
        res = int(crop.get("height") or ip.size.get("shortest_edge"))
        vlm = cls(model, encode_image, encode_text, geometry, ip.image_mean, ip.image_std, res, logit_scale)
        return _check_resolution(vlm, resolution, f"{KEY}={path}")

    @classmethod
    def from_open_clip(cls, model: str, checkpoint: str | Path, dtype: str = "float32", embed: str = "pooled",
                       logit_scale: float = 100.0, resolution: int | None = None, force_quick_gelu: bool = True,
                       trust_remote_code: bool = False) -> CLIPVLM:
        """From an open_clip model name (or model-config JSON file) and a weights file (a state dict).
        ``force_quick_gelu``: OpenAI's weights and encoders fine-tuned from them (TeCoA, FARE) use QuickGELU,
        which open_clip turns on by itself only for its "openai" tag."""
        _check_embed(embed)
        torch_dtype = parse_dtype(dtype, "vlm.dtype")
        ckpt = Path(str(checkpoint)).expanduser()
        if not ckpt.is_file():
            raise CheckpointError(f"vlm.open_clip.checkpoint={checkpoint}: no such file; give the open_clip weights "
                                  "file (a state dict, e.g. open_clip_pytorch_model.bin); pretrained tags such as "
                                  "'openai' are not downloaded")
        import open_clip

        name = str(model)
        if name.endswith(".json"):
            cfg_file = Path(name).expanduser()
            if not cfg_file.is_file():
                raise CheckpointError(f"vlm.open_clip.model={model}: no such model-config file")
            open_clip.add_model_config(cfg_file)
            name = cfg_file.stem
        elif name not in open_clip.list_models():
            raise ConfigError(f"vlm.open_clip.model={model} is not an open_clip model name (e.g. ViT-B-32) nor a "
                              "model-config .json file")
        try:
            net, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=str(ckpt), force_quick_gelu=bool(force_quick_gelu))
        except (RuntimeError, AssertionError, ValueError, KeyError) as e:  # weights that do not fit the model
            raise CheckpointError(f"vlm.open_clip.checkpoint={checkpoint} does not fit model {model}: "
                                  f"{(str(e) or type(e).__name__).splitlines()[0]}") from None
        net = net.to(torch_dtype).eval().requires_grad_(False)
        tokenizer = open_clip.get_tokenizer(name)
        steps = list(getattr(preprocess, "transforms", []))
        norm = [t for t in steps if type(t).__name__ == "Normalize"]
        if len(norm) != 1:
            raise CheckpointError(f"vlm.open_clip.model={model}: expected one Normalize in its preprocessing")
        geometric = [t for t in steps if t is not norm[0]]

        def encode_image(pv: torch.Tensor) -> torch.Tensor:
            return net.encode_image(pv)

        def encode_text(texts: list[str]) -> torch.Tensor:
            return net.encode_text(tokenizer(texts).to(next(net.parameters()).device))

        def geometry(im: Image.Image) -> torch.Tensor:
            out = im
            for t in geometric:
                out = t(out)
            return out

        size = getattr(net.visual, "image_size", None)
        res = int(size[0] if isinstance(size, tuple | list) else size)
        vlm = cls(net, encode_image, encode_text, geometry, norm[0].mean, norm[0].std, res, logit_scale)
        return _check_resolution(vlm, resolution, f"vlm.open_clip.model={model}")

    # ---------------------------------------------------------------------------------- the contract

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def _compute_dtype(self) -> torch.dtype:
        return torch.promote_types(self.dtype, torch.float32)

    def to_pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """The model's resize + centre crop, in [0, 1], not normalised."""
        return torch.stack([self._geometry(im.convert("RGB")).float() for im in images]).clamp(0, 1)

    def _pixel_values(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels in [0, 1] -> normalised model input (the only place normalisation happens)."""
        check_batch(x, self.resolution)
        x = x.to(device=self.mean.device, dtype=self._compute_dtype)
        return ((x - self.mean.to(x.dtype)) / self.std.to(x.dtype)).to(self.dtype)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self._encode_image(self._pixel_values(x)).to(self._compute_dtype), dim=-1)

    def zero_shot_logits(self, x: torch.Tensor, classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
        classes = self._classes(self._encode_text, classnames, templates, self.mean.device)
        return self.logit_scale * self.embed(x) @ classes.to(self._compute_dtype).T


def _tensor(out: Any) -> torch.Tensor:
    """transformers 4.x returns features as a tensor, 5.x as an output object with ``pooler_output``."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _check_embed(embed: str) -> None:
    if embed != "pooled":
        raise ConfigError(f"vlm.embed={embed!r}: CLIP offers only 'pooled' (its projected image embedding)")


def _check_resolution(vlm: CLIPVLM, resolution: int | None, where: str) -> CLIPVLM:
    if resolution is not None and int(resolution) != vlm.resolution:
        raise ConfigError(f"vlm.resolution={resolution} but {where} takes {vlm.resolution} px images; "
                          f"set vlm.resolution={vlm.resolution}")
    return vlm
