"""OpenFlamingo (open_flamingo 2.0.1) behind the VLM contract.

The model is built by the package's own ``create_model_and_transforms`` from the same arguments its README
uses, then ``checkpoint.pt`` is loaded on top. Two departures from the package, both needed for attacks and
for safety, and both made without editing it:

* open_flamingo encodes images under ``torch.no_grad()``; the built model's class is swapped for a subclass
  whose vision path keeps the autograd graph, so gradients reach the pixels.
* the factory passes ``trust_remote_code=True`` to transformers; here the flag is ``vlm.trust_remote_code``
  (default false). OpenFlamingo-9B's MPT-7B then loads with transformers' native ``MptForCausalLM``, whose
  parameter names match the checkpoint's.

A speed option, the same function: ``vlm.attention=sdpa`` (default ``einsum``, the package's code) swaps the classes of the perceiver's and the
cross-attention's attention blocks for ones that call PyTorch's scaled-dot-product attention
(``openflamingo_attention``).
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
from open_flamingo.src import factory as of_factory
from open_flamingo.src.flamingo import Flamingo
from PIL import Image
from torchvision import transforms as T

from evaluators.errors import ConfigError
from evaluators.vlms.base import VLM, CheckpointError, TokenIds, Turn, check_batch, pad_batch
from evaluators.vlms.checkpoints import HF_WEIGHTS, parse_dtype, require_files, resolve_folder
from evaluators.vlms.openflamingo_attention import ATTENTION, set_attention

MEDIA = "<image>"
END_OF_CHUNK = "<|endofchunk|>"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
EMBED_OUTPUTS = ("pooled", "tokens")


def format_turns(turns: Sequence[Turn]) -> str:
    """OpenFlamingo's prompt: per turn ``<image>`` (if the turn has one) + user text, and for answered turns the
    answer + ``<|endofchunk|>`` and a newline, as open_flamingo's evaluation joins its demonstrations (also what
    the tiny OpenFlamingo is trained on)."""
    parts = []
    for turn in turns:
        text = (MEDIA if turn.image else "") + turn.user
        if turn.assistant is not None:
            text += turn.assistant + END_OF_CHUNK + "\n"
        parts.append(text)
    return "".join(parts)


class _PixelGradFlamingo(Flamingo):
    """open_flamingo's Flamingo with a vision path that keeps the autograd graph (the package runs the
    vision encoder under ``torch.no_grad()``, which would stop every attack gradient there)."""

    def _encode_vision_x(self, vision_x: torch.Tensor) -> None:
        if vision_x.ndim != 6 or vision_x.shape[2] != 1:
            raise ValueError(f"vision_x must be (B, T_img, 1, C, H, W), got {tuple(vision_x.shape)}")
        b, t = vision_x.shape[:2]
        patch_tokens = self.vision_encoder(vision_x.flatten(0, 2))[1]
        latents = self.perceiver(patch_tokens.unflatten(0, (b, t, 1)))
        for layer in self.lang_encoder._get_decoder_layers():
            layer.condition_vis_x(latents)


def _check_lm_folders(lang_encoder_path: str, tokenizer_path: str) -> None:
    """The language-model and tokenizer folders (or cached hub ids) are complete, before anything loads."""
    lm = resolve_folder(lang_encoder_path, "vlm.lang_encoder_path", "transformers causal LM")
    require_files(lm, "vlm.lang_encoder_path", [("config", ["config.json"]), ("the weights", HF_WEIGHTS)])
    tok = resolve_folder(tokenizer_path, "vlm.tokenizer_path", "transformers tokenizer")
    require_files(tok, "vlm.tokenizer_path", [("a tokenizer", TOKENIZER_FILES)])


def _vision_encoder_name(value: str) -> str:
    """An open_clip model name, or the name under which an open_clip model-config JSON file is registered."""
    import open_clip

    if value.endswith(".json"):
        path = Path(value).expanduser()
        if not path.is_file():
            raise CheckpointError(f"vlm.clip_vision_encoder_path={value}: no such open_clip model-config file")
        try:
            cfg = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"vlm.clip_vision_encoder_path={value} is not valid JSON: {e}") from None
        if not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
            raise CheckpointError(f"vlm.clip_vision_encoder_path={value} must be an open_clip model config with "
                              "embed_dim, vision_cfg and text_cfg")
        open_clip.add_model_config(path)
        return path.stem
    if value not in open_clip.list_models():
        raise CheckpointError(f"vlm.clip_vision_encoder_path={value} is neither an open_clip model name nor a .json "
                          "model-config file")
    return value


def _vision_weights(name: str, pretrained: str | None) -> None:
    """Fail fast unless ``pretrained`` is None, an existing weights file, or an open_clip tag of ``name`` whose
    weights are in the local Hugging Face cache (where open_clip looks first)."""
    import open_clip
    from huggingface_hub import try_to_load_from_cache

    key = "vlm.clip_vision_encoder_pretrained"
    if pretrained is None or Path(pretrained).expanduser().is_file():
        return
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained not in tags:
        raise CheckpointError(f"{key}={pretrained} is neither a weights file nor an open_clip tag of {name} "
                          f"(tags: {', '.join(tags) or 'none'})")
    hub = (open_clip.get_pretrained_cfg(name, pretrained).get("hf_hub") or "").strip("/")
    if hub:
        files = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
        if not any(isinstance(try_to_load_from_cache(hub, f), str) for f in files):
            raise CheckpointError(f"{key}={pretrained}: the weights of {name} (hub id {hub}) are not in the local "
                              "Hugging Face cache; set the key to the weights file instead")


def _read_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """The state dict in ``checkpoint.pt``: a plain state dict (the published file) or open_flamingo's training
    checkpoint (``model_state_dict``, possibly with DDP's ``module.`` prefix)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise CheckpointError(f"vlm.checkpoint={path}: no such file; it must be OpenFlamingo's checkpoint.pt "
                          "(e.g. from openflamingo/OpenFlamingo-9B-vitl-mpt7b)")
    try:
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated or foreign file
        raise CheckpointError(f"vlm.checkpoint={path} cannot be read as a weights-only torch file: "
                          f"{str(e).splitlines()[0]}") from None
    if isinstance(obj, dict) and isinstance(obj.get("model_state_dict"), dict):
        obj = obj["model_state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"vlm.checkpoint={path} is not a state dict of tensors")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    if not any(k.startswith("perceiver.") for k in obj) or not any("gated_cross_attn" in k for k in obj):
        raise CheckpointError(f"vlm.checkpoint={path} has no perceiver or gated cross-attention weights; it must be "
                          "an OpenFlamingo checkpoint.pt")
    return obj


def _load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], vision_pretrained: bool) -> None:
    """Load ``state`` non-strictly and accept only gaps filled by the frozen, separately loaded parts: the
    language model (from its folder) and, when its weights were named, the vision encoder."""
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        detail = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), str(e).splitlines()[0])
        raise CheckpointError(f"vlm.checkpoint does not fit the model built from vlm.clip_vision_encoder_path, "
                          f"vlm.lang_encoder_path and vlm.cross_attn_every_n_layers: {detail}") from None
    if result.unexpected_keys:
        raise CheckpointError(f"vlm.checkpoint has {len(result.unexpected_keys)} weights this model lacks, e.g. "
                          f"{result.unexpected_keys[0]}; check vlm.cross_attn_every_n_layers and the encoders")
    tensors = model.state_dict(keep_vars=True)
    loaded = {id(tensors[k]) for k in state}
    for key in result.missing_keys:
        t = tensors[key]
        if id(t) in loaded:
            continue  # tied to a loaded weight (e.g. lm_head and the input embeddings)
        if getattr(t, "requires_grad", False):
            raise CheckpointError(f"vlm.checkpoint is incomplete: it lacks the trained weight {key}")
        if key.startswith("vision_encoder.") and not vision_pretrained:
            raise CheckpointError("vlm.checkpoint holds no vision encoder weights, so "
                              "vlm.clip_vision_encoder_pretrained must name them (an open_clip tag or file)")


@contextlib.contextmanager
def _transformers_loading(trust_remote_code: bool, dtype: torch.dtype) -> Iterator[None]:
    """Run open_flamingo's factory with our ``trust_remote_code`` (it hard-codes True) and the language
    model loaded directly in ``dtype`` (a 7B model in fp32 would need 28 GB of host memory first)."""

    def wrap(auto_cls: type, **extra: object) -> type:
        class Wrapped:
            @staticmethod
            def from_pretrained(*args: object, **kwargs: object) -> object:
                kwargs.update(extra, trust_remote_code=trust_remote_code)
                return auto_cls.from_pretrained(*args, **kwargs)

        return Wrapped

    with mock.patch.object(of_factory, "AutoTokenizer", wrap(of_factory.AutoTokenizer)), \
            mock.patch.object(of_factory, "AutoModelForCausalLM", wrap(of_factory.AutoModelForCausalLM, dtype=dtype)):
        yield


class OpenFlamingoVLM(VLM):
    """OpenFlamingo: 224 px images in [0, 1], CLIP normalisation inside, prompts in OpenFlamingo's
    ``<image>...<|endofchunk|>`` framing."""

    family = "openflamingo"
    capabilities = frozenset({"generate", "loss", "embed"})

    def __init__(self, model: Flamingo, image_processor: T.Compose, tokenizer: object, embed: str = "pooled"):
        super().__init__()
        if embed not in EMBED_OUTPUTS:
            raise ConfigError(f"vlm.embed must be one of {list(EMBED_OUTPUTS)}, got {embed!r}")
        model.__class__ = _PixelGradFlamingo
        self.model = model
        self.tokenizer = tokenizer
        self._token_ids = TokenIds(self._text_ids)
        self.embed_output = embed
        steps = list(image_processor.transforms)
        norm = next(s for s in steps if isinstance(s, T.Normalize))
        self._to_unit = T.Compose([s for s in steps if s is not norm])
        self.register_buffer("mean", torch.tensor(norm.mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(norm.std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.resolution = int(model.vision_encoder.image_size[0])

    @classmethod
    def from_pretrained(cls, *, clip_vision_encoder_path: str, clip_vision_encoder_pretrained: str | None,
                        lang_encoder_path: str, tokenizer_path: str, cross_attn_every_n_layers: int,
                        checkpoint: str, resolution: int | None = None, trust_remote_code: bool = False,
                        dtype: str = "fp32", embed: str = "pooled", attention: str = "einsum") -> OpenFlamingoVLM:
        """Build with open_flamingo's factory and load ``checkpoint`` (trained weights only, or the whole
        model). Every file is checked before anything heavy loads."""
        import open_clip

        torch_dtype = parse_dtype(dtype, "vlm.dtype")
        if embed not in EMBED_OUTPUTS:
            raise ConfigError(f"vlm.embed must be one of {list(EMBED_OUTPUTS)}, got {embed!r}")
        if attention not in ATTENTION:
            raise ConfigError(f"vlm.attention must be one of {', '.join(ATTENTION)}, got {attention!r}")
        name = _vision_encoder_name(str(clip_vision_encoder_path))
        size = open_clip.get_model_config(name)["vision_cfg"]["image_size"]
        if resolution is not None and int(resolution) != size:
            raise ConfigError(f"vlm.resolution={resolution} but the vision encoder {name} takes {size} px")
        pretrained = str(clip_vision_encoder_pretrained) if clip_vision_encoder_pretrained else None
        _vision_weights(name, pretrained)
        _check_lm_folders(str(lang_encoder_path), str(tokenizer_path))
        state = _read_checkpoint(str(checkpoint))
        try:
            # fixed seed: the rows that resize_token_embeddings adds to an untied output layer are random and
            # not in the published checkpoint, so a run must draw the same ones every time
            with _transformers_loading(bool(trust_remote_code), torch_dtype), torch.random.fork_rng(devices=[]), \
                    contextlib.redirect_stdout(io.StringIO()):
                torch.manual_seed(0)
                model, image_processor, tokenizer = of_factory.create_model_and_transforms(
                    name, pretrained, str(lang_encoder_path), str(tokenizer_path),
                    cross_attn_every_n_layers=int(cross_attn_every_n_layers), use_local_files=True)
        except ValueError as e:
            if "trust_remote_code" in str(e):
                raise ConfigError(f"vlm.lang_encoder_path={lang_encoder_path} needs its own Python code, which "
                                  "runs only with vlm.trust_remote_code=true") from None
            raise
        _load_weights(model, state, vision_pretrained=pretrained is not None)
        set_attention(model, attention)
        return cls(model.to(torch_dtype), image_processor, tokenizer, embed=embed).eval().requires_grad_(False)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.perceiver.latents.dtype

    def to_pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """open_clip's own evaluation preprocessing (resize the short side, centre crop) without the
        normalisation, which happens inside ``_normalise``."""
        return torch.stack([self._to_unit(im.convert("RGB")) for im in images])

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        check_batch(x, self.resolution)
        x = x.to(torch.promote_types(x.dtype, torch.float32))  # fp64 stays fp64 (gradient checks)
        return ((x - self.mean.to(x.dtype)) / self.std.to(x.dtype)).to(self.dtype)

    def _vision_x(self, x: torch.Tensor, *lists: Sequence[str]) -> torch.Tensor:
        check_batch(x, self.resolution, *lists)
        return self._normalise(x)[:, None, None]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The CLIP image embedding (``pooled``) or the mean of the perceiver latents the language model
        cross-attends to (``tokens``), L2-normalised."""
        pooled, patch_tokens = self.model.vision_encoder(self._normalise(x))
        if self.embed_output == "tokens":
            pooled = self.model.perceiver(patch_tokens[:, None, None]).mean(dim=(1, 2))
        return F.normalize(pooled.to(torch.promote_types(pooled.dtype, torch.float32)), dim=-1)

    def format_prompt(self, turns: Sequence[Turn]) -> str:
        return format_turns(turns)

    def _text_ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def _tokenize(self, texts: Sequence[str], side: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, attention mask) of the texts padded to the longest on ``side``, as the tokenizer's own batch
        call pads them; each text's ids are memoised (``TokenIds``)."""
        return pad_batch([self._token_ids(t) for t in texts], int(self.tokenizer.pad_token_id), side == "left",
                         self.mean.device)

    @torch.no_grad()
    def generate(self, x: torch.Tensor, prompts: Sequence[str], **decoding: object) -> list[str]:
        """Decoded continuation of each prompt (left-padded, as open_flamingo's evaluation does); stops at
        ``<|endofchunk|>``. Decoding keys go to Hugging Face ``generate`` (num_beams, max_new_tokens, ...)."""
        vision_x = self._vision_x(x, prompts)
        ids, mask = self._tokenize(prompts, "left")
        out = self.model.generate(vision_x, ids, attention_mask=mask, pad_token_id=self.tokenizer.pad_token_id,
                                  **{"do_sample": False, **decoding})
        return self.tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)

    def loss(self, x: torch.Tensor, prompts: Sequence[str], targets: Sequence[str]) -> torch.Tensor:
        """(B,) mean cross-entropy over the tokens of ``target + <|endofchunk|>``, the text tokenised in one
        piece as in training; the prompt's tokens must be a prefix of the whole text's tokens."""
        vision_x = self._vision_x(x, prompts, targets)
        ids, mask = self._tokenize([p + t + END_OF_CHUNK for p, t in zip(prompts, targets, strict=True)], "right")
        is_target = torch.zeros_like(mask, dtype=torch.bool)
        for i, prompt in enumerate(prompts):
            head = self._token_ids(prompt)
            if tuple(ids[i, : len(head)].tolist()) != head:
                raise ValueError(f"prompt {prompt!r} does not tokenise to a prefix of prompt+target")
            is_target[i, len(head):] = mask[i, len(head):].bool()
        logits = self.model(vision_x=vision_x, lang_x=ids, attention_mask=mask).logits
        logits = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))
        ce = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        weight = is_target[:, 1:].float()
        return (ce * weight).sum(1) / weight.sum(1)
