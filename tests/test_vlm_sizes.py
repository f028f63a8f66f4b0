"""The real models built on the meta device from their published configurations: parameter counts equal the
published checkpoints' (llava-hf/llava-1.5-7b-hf: 7,063,427,072; openai/clip-vit-base-patch32: 151,277,313)."""

from __future__ import annotations

import model_sizes


def test_parameter_counts_and_memory_estimates():
    by_name = {e.name: e for e in model_sizes.estimates()}
    llava, clip = by_name["LLaVA-1.5-7B"], by_name["CLIP ViT-B/32"]
    assert llava.params == 7_063_427_072
    assert clip.params == 151_277_313
    half, full = model_sizes.memory_gib(llava, 2, attack=True), model_sizes.memory_gib(llava, 4, attack=True)
    assert 13.2 < model_sizes.memory_gib(llava, 2, attack=False) < half < full
    assert model_sizes.memory_gib(llava, 2, attack=True, checkpointing=True) < half
    assert abs(model_sizes.memory_gib(llava, 4, attack=False) - 2 * 7_063_427_072 * 2 / 1024**3) < 1.0
    assert "| LLaVA-1.5-7B | 7,063,427,072 | float16 / bfloat16 |" in model_sizes.table()
