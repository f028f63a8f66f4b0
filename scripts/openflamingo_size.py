"""Parameter count of OpenFlamingo-9B, built on the meta device (no weights, no memory) from its published
hyperparameters: open_clip ViT-L-14, MPT-7B (d_model 4096, 32 layers, 32 heads, expansion 4, ALiBi) with the
GPT-NeoX-20B tokenizer plus open_flamingo's two special tokens and pad (50280 rows), cross-attention every
4 layers. Weight memory per precision is parameters x bytes; the README's memory table starts from it.

    uv run python scripts/openflamingo_size.py
"""

from __future__ import annotations

import json

import open_clip
import torch
from open_flamingo.src.flamingo import Flamingo
from open_flamingo.src.flamingo_lm import FlamingoLMMixin
from open_flamingo.src.utils import extend_instance
from transformers import MptConfig, MptForCausalLM

MPT_7B = dict(d_model=4096, n_heads=32, n_layers=32, expansion_ratio=4, max_seq_len=2048, vocab_size=50432,
              attn_config={"attn_impl": "torch", "alibi": True}, no_bias=True)
TOKENIZER_ROWS = 50280  # len(gpt-neox-20b tokenizer) = 50277, + <|endofchunk|>, <image>, <PAD>


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


def build_meta() -> Flamingo:
    """OpenFlamingo-9B's modules as open_flamingo's factory assembles them, on the meta device."""
    with torch.device("meta"):
        clip = open_clip.create_model("ViT-L-14", device="meta")
        clip.visual.output_tokens = True
        lm = MptForCausalLM(MptConfig(**MPT_7B))
        extend_instance(lm, FlamingoLMMixin)
        lm.set_decoder_layers_attr_name("transformer.blocks")
        lm.resize_token_embeddings(TOKENIZER_ROWS, mean_resizing=False)
        return Flamingo(clip, lm, eoc_token_id=0, media_token_id=1, vis_dim=1024, cross_attn_every_n_layers=4)


def main() -> None:
    model = build_meta()
    total = count(model)
    parts = {"vision_encoder": count(model.vision_encoder), "perceiver": count(model.perceiver),
             "gated_cross_attn": count(model.lang_encoder.gated_cross_attn_layers),
             "lm_input_embeddings": count(model.lang_encoder.get_input_embeddings())}
    parts["language_model_other"] = total - sum(parts.values())
    trainable = parts["perceiver"] + parts["gated_cross_attn"] + parts["lm_input_embeddings"]
    weights_gib = {k: round(total * b / 2**30, 1) for k, b in (("fp32", 4), ("bf16", 2), ("fp16", 2))}
    print(json.dumps({"total": total, "trainable_in_checkpoint": trainable, "parts": parts,
                      "weights_gib": weights_gib}, indent=2))


if __name__ == "__main__":
    main()
