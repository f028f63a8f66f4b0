"""Builders, savers and loaders of the three tiny models of the shapes world, in the published layouts:
a LLaVA (llava-hf layout: ``LlavaForConditionalGeneration`` + ``LlavaProcessor``), an OpenFlamingo (the
open_flamingo package's ``checkpoint.pt`` + a causal-LM folder + an open_clip vision tower) and a CLIP
(openai/clip-vit-base-patch32 layout: ``CLIPModel`` + ``CLIPProcessor``).

Why here and not in ``evaluators/``: only ``scripts/train_tiny_vlms.py`` and its evaluation build these
models from scratch; the harness loads them through the same adapters as the real checkpoints.

Resolutions keep the real input/denoiser ratio (224 or 336 px models, 256 px denoiser) against the shapes
denoiser's 64 px: CLIP and OpenFlamingo see 56 px (= 64 * 224 / 256), LLaVA 84 px (= 64 * 336 / 256).
"""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    CLIPTokenizerFast,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

CLIP_RES, OF_RES, LLAVA_RES = 56, 56, 84
#: OpenAI CLIP's normalisation, used by all three image processors (as in the real models).
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
OF_VISION_NAME = "tiny-of-vit-56"
#: llava-hf's LLaVA-1.5 chat template: "USER: <image>\n{text} ASSISTANT:" (images first, then the text).
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}"
    "{% endif %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def image_processor(resolution: int) -> CLIPImageProcessor:
    """CLIP's preprocessing (bicubic resize of the short side, centre crop, OpenAI mean/std) at ``resolution``."""
    return CLIPImageProcessor(size={"shortest_edge": resolution}, crop_size={"height": resolution, "width": resolution},
                              image_mean=list(MEAN), image_std=list(STD), resample=3, do_convert_rgb=True)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """Pixels in [0, 1] -> the models' normalised input (normalisation lives inside the model)."""
    mean = torch.tensor(MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


# ------------------------------------------------------------------------------------------ tokenizers


def train_bpe(texts: list[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE (GPT/Llama-3 style) with <s>, </s>, <unk>; encodes with a leading <s>."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    return tok


def lm_tokenizer(bpe: Tokenizer) -> PreTrainedTokenizerFast:
    """The causal LM's tokenizer (no pad token, as MPT/LLaMA ship; OpenFlamingo adds its own tokens)."""
    return PreTrainedTokenizerFast(tokenizer_object=bpe.from_str(bpe.to_str()), bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=256,
                                   model_input_names=["input_ids", "attention_mask"])


def llava_tokenizer(bpe: Tokenizer) -> PreTrainedTokenizerFast:
    """LLaVA's tokenizer: the LM's plus the <image> and <pad> special tokens, as llava-hf adds them."""
    tok = lm_tokenizer(bpe)
    tok.add_special_tokens({"pad_token": "<pad>", "additional_special_tokens": ["<image>"]})
    tok.padding_side = "left"
    return tok


def clip_tokenizer(texts: list[str], vocab_size: int, workdir: Path) -> CLIPTokenizerFast:
    """CLIP's tokenizer format: a lowercase BPE with the '</w>' end-of-word suffix over the 256-symbol byte
    alphabet, written as vocab.json + merges.txt and converted by transformers' own CLIP converter."""
    tok = Tokenizer(models.BPE(unk_token="<|endoftext|>", end_of_word_suffix="</w>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, end_of_word_suffix="</w>", show_progress=False,
                                  special_tokens=["<|startoftext|>", "<|endoftext|>"])
    tok.train_from_iterator([t.lower() for t in texts], trainer)
    model = json.loads(tok.to_str())["model"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = sorted(alphabet) + [a + "</w>" for a in sorted(alphabet)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    vocab += ["".join(m.split()) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = list(dict.fromkeys(vocab))
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (workdir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizerFast(vocab_file=str(workdir / "vocab.json"), merges_file=str(workdir / "merges.txt"),
                             model_max_length=32)


# ---------------------------------------------------------------------------------------------- models


def build_clip(tokenizer: CLIPTokenizerFast, width: int = 64, layers: int = 4) -> tuple[CLIPModel, CLIPProcessor]:
    """A CLIP ViT at 56 px, patch 8 (a 7 x 7 grid, as ViT-B/32 at 224 px)."""
    cfg = CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": width, "intermediate_size": 4 * width,
                     "num_hidden_layers": layers, "num_attention_heads": 4, "max_position_embeddings": 32,
                     "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                     "pad_token_id": tokenizer.pad_token_id},
        vision_config={"hidden_size": width, "intermediate_size": 4 * width, "num_hidden_layers": layers,
                       "num_attention_heads": 4, "image_size": CLIP_RES, "patch_size": 8},
        projection_dim=width,
    )
    return CLIPModel(cfg), CLIPProcessor(image_processor=image_processor(CLIP_RES), tokenizer=tokenizer)


def build_llava(bpe: Tokenizer, width: int = 128, vision_width: int = 64) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """LLaVA-1.5's structure: CLIP ViT tower (second-to-last layer, CLS dropped), 2-layer GELU MLP projector,
    Llama decoder; 84 px input, patch 12 (a 7 x 7 grid of image tokens)."""
    tok = llava_tokenizer(bpe)
    image_token = tok.convert_tokens_to_ids("<image>")
    cfg = LlavaConfig(
        vision_config={"model_type": "clip_vision_model", "hidden_size": vision_width, "intermediate_size": 4 * vision_width,
                       "num_hidden_layers": 4, "num_attention_heads": 4, "image_size": LLAVA_RES, "patch_size": 12,
                       "projection_dim": vision_width},
        text_config={"model_type": "llama", "vocab_size": len(tok), "hidden_size": width, "intermediate_size": 2 * width,
                     "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4,
                     "max_position_embeddings": 256, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                     "pad_token_id": tok.pad_token_id},
        image_token_index=image_token, vision_feature_layer=-2, vision_feature_select_strategy="default",
        projector_hidden_act="gelu", pad_token_id=tok.pad_token_id,
    )
    model = LlavaForConditionalGeneration(cfg)
    model.generation_config.pad_token_id = tok.pad_token_id
    proc = LlavaProcessor(image_processor=image_processor(LLAVA_RES), tokenizer=tok, patch_size=12,
                          vision_feature_select_strategy="default", chat_template=LLAVA_CHAT_TEMPLATE,
                          num_additional_image_tokens=1)
    return model, proc


def of_vision_config(width: int = 64) -> dict:
    """open_clip model config of OpenFlamingo's vision tower: a ViT at 56 px, patch 7 (8 x 8 grid); the text
    tower is required by open_clip's CLIP class but never used by OpenFlamingo, so it is minimal."""
    return {"embed_dim": width,
            "vision_cfg": {"image_size": OF_RES, "layers": 4, "width": width, "head_width": 16, "patch_size": 7,
                           "mlp_ratio": 4.0},
            "text_cfg": {"context_length": 8, "vocab_size": 16, "width": 16, "heads": 1, "layers": 1}}


def save_lm(bpe: Tokenizer, folder: Path, width: int = 128, layers: int = 2) -> None:
    """The (untrained) causal LM folder OpenFlamingo starts from: Llama weights + tokenizer, safetensors."""
    tok = lm_tokenizer(bpe)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)


def load_openflamingo(folder: Path, vision_weights: str | None = None):
    """OpenFlamingo exactly as its package builds it: the vision config registered with open_clip, the vision
    tower from ``vision_weights`` (an open_clip state dict), the LM and tokenizer from ``folder/lm``; then the
    package's ``checkpoint.pt`` (trainable weights) when present, loaded with ``weights_only=True``."""
    from open_flamingo import create_model_and_transforms

    open_clip.add_model_config(str(folder / f"{OF_VISION_NAME}.json"))
    if vision_weights is None and (folder / "vision_encoder.safetensors").is_file():
        vision_weights = str(folder / "vision_encoder.safetensors")
    model, _, tok = create_model_and_transforms(
        clip_vision_encoder_path=OF_VISION_NAME, clip_vision_encoder_pretrained=vision_weights,
        lang_encoder_path=str(folder / "lm"), tokenizer_path=str(folder / "lm"), cross_attn_every_n_layers=1,
        use_local_files=True)
    ckpt = folder / "checkpoint.pt"
    if ckpt.is_file():
        missing = model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True), strict=False)
        if missing.unexpected_keys:
            raise RuntimeError(f"{ckpt}: unexpected keys {missing.unexpected_keys[:3]}")
    tok.padding_side = "left"
    return model, tok


def trainable_state_dict(model) -> dict[str, torch.Tensor]:
    """What open_flamingo's training saves as ``checkpoint.pt``: the perceiver, the gated cross-attention
    layers (under the LM's decoder layers) and the LM embeddings; never the vision tower nor the duplicate
    ``old_decoder_blocks`` / ``gated_cross_attn_layers`` views."""
    from open_flamingo.train.train_utils import filter_state_dict_to_trainable

    model.requires_grad_(False)
    model.perceiver.requires_grad_(True)
    model.lang_encoder.gated_cross_attn_layers.requires_grad_(True)
    model.lang_encoder.get_input_embeddings().requires_grad_(True)
    state = filter_state_dict_to_trainable(model, model.state_dict())
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


def save_openflamingo(model, tok, folder: Path) -> None:
    """checkpoint.pt (package format), the trained LM body back into ``lm/`` (the LM is trained here, frozen in
    the real OpenFlamingo), and the vision tower as an open_clip safetensors state dict."""
    from safetensors.torch import save_file

    torch.save(trainable_state_dict(model), folder / "checkpoint.pt")
    lm_dir = folder / "lm"
    base = LlamaForCausalLM.from_pretrained(lm_dir)
    n = base.get_input_embeddings().weight.shape[0]
    src = model.lang_encoder.state_dict()
    new = {}
    for k in base.state_dict():
        key = k
        if k.startswith("model.layers."):
            i, rest = k[len("model.layers."):].split(".", 1)
            key = f"model.layers.{i}.decoder_layer.{rest}"
        val = src[key]
        new[k] = val[:n] if k in ("model.embed_tokens.weight", "lm_head.weight") else val
    base.load_state_dict(new)
    base.save_pretrained(lm_dir, safe_serialization=True)
    clip_model = open_clip.create_model(OF_VISION_NAME, pretrained=None)
    state = clip_model.state_dict()
    state.update({f"visual.{k}": v for k, v in model.vision_encoder.state_dict().items()})
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "vision_encoder.safetensors"))


def encode_vision_with_grad(model, vision_x: torch.Tensor) -> None:
    """Flamingo's ``_encode_vision_x`` without its ``torch.no_grad()`` around the vision tower, so training
    (and an attack) reaches the pixels; then conditions the LM's cross-attention layers."""
    b, t, f = vision_x.shape[:3]
    feats = model.vision_encoder(vision_x.flatten(0, 2))[1]
    feats = model.perceiver(feats.view(b, t, f, *feats.shape[1:]))
    for layer in model.lang_encoder._get_decoder_layers():
        layer.condition_vis_x(feats)
