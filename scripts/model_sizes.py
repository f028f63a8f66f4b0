"""Parameter counts of the paper's LLaVA-1.5-7B and CLIP ViT-B/32, built on PyTorch's meta device from their
published configurations (written out below, nothing downloaded), and ESTIMATES of the GPU memory inference and
attacks need per precision (no GPU measured them).

    python scripts/model_sizes.py            # prints the README's table

Memory model (estimates): weights = parameters x bytes per parameter; inference adds the KV cache and one
layer's activations (small at batch 1); an attack (gradient w.r.t. the pixels, weights frozen) keeps every
layer's activations for the backward pass: about ``tokens x width x 34`` bytes per transformer layer in 16-bit
(Korthikanti et al. 2022, with memory-efficient attention, so no tokens^2 term), twice that in float32; with
gradient checkpointing only each layer's input is kept (``tokens x width x bytes``) plus one layer's
activations. The float32 logits of the loss (tokens x vocabulary x 4 bytes) are added.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

GIB = 1024**3


def llava_15_7b_config():
    """llava-hf/llava-1.5-7b-hf's configuration: CLIP ViT-L/14-336 tower, 2-layer GELU projector, Vicuna-7B."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
    text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                       rms_norm_eps=1e-5, tie_word_embeddings=False)
    return LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=32000,
                       vision_feature_layer=-2, vision_feature_select_strategy="default",
                       projector_hidden_act="gelu")


def clip_vit_b32_config():
    """openai/clip-vit-base-patch32's configuration."""
    from transformers import CLIPConfig

    text = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                num_attention_heads=8, max_position_embeddings=77)
    vision = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  image_size=224, patch_size=32)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=512)


def count_parameters(model_cls, config) -> int:
    """Parameters of ``model_cls(config)`` built on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        model = model_cls(config)
    return sum(p.numel() for p in model.parameters())


@dataclass
class Tower:
    """One transformer stack as the memory model sees it."""

    layers: int
    width: int
    tokens: int


@dataclass
class Estimate:
    name: str
    params: int
    towers: list[Tower]
    logits: int = 0  # tokens x vocabulary of the loss (0: no language-model loss)
    kv: int = 0      # tokens x layers x width of the KV cache in generation


def memory_gib(e: Estimate, bytes_per: int, attack: bool, checkpointing: bool = False) -> float:
    """Estimated peak GPU memory (GiB) at batch 1 (see the module docstring)."""
    total = e.params * bytes_per
    if not attack:
        total += 2 * e.kv * bytes_per + max(t.tokens * t.width * 34 for t in e.towers) * bytes_per / 2
        return total / GIB
    scale = bytes_per / 2  # the 34-bytes rule is for 16-bit activations
    for t in e.towers:
        if checkpointing:
            total += t.layers * t.tokens * t.width * bytes_per + t.tokens * t.width * 34 * scale
        else:
            total += t.layers * t.tokens * t.width * 34 * scale
    return (total + e.logits * 4 * 2) / GIB  # float32 logits and their gradient


def estimates() -> list[Estimate]:
    from transformers import CLIPModel, LlavaForConditionalGeneration

    llava_tokens = 576 + 40  # image tokens + a caption prompt and target
    return [
        Estimate("LLaVA-1.5-7B", count_parameters(LlavaForConditionalGeneration, llava_15_7b_config()),
                 [Tower(24, 1024, 577), Tower(32, 4096, llava_tokens)], logits=llava_tokens * 32064,
                 kv=llava_tokens * 32 * 4096),
        Estimate("CLIP ViT-B/32", count_parameters(CLIPModel, clip_vit_b32_config()), [Tower(12, 768, 50)]),
    ]


def table() -> str:
    rows = ["| model | parameters | precision | inference (GiB) | attack (GiB) | attack, checkpointing (GiB) |",
            "|---|---|---|---|---|---|"]
    for e in estimates():
        for name, b in (("float16 / bfloat16", 2), ("float32", 4)):
            rows.append(f"| {e.name} | {e.params:,} | {name} | {memory_gib(e, b, False):.1f} | "
                        f"{memory_gib(e, b, True):.1f} | {memory_gib(e, b, True, True):.1f} |")
    return "\n".join(rows)


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    print(table())


if __name__ == "__main__":
    main()
