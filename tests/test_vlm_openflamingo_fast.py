"""The OpenFlamingo adapter's speed paths compute what the package computes: memoised token ids padded as the
tokenizer pads them, and the scaled-dot-product attention blocks (``vlm.attention=sdpa``) against open_flamingo's
own einsum blocks, outputs and gradients, masks and edge cases included."""

from __future__ import annotations

import pytest
import torch
from open_flamingo.src.helpers import MaskedCrossAttention, PerceiverAttention

from evaluators.errors import ConfigError
from evaluators.vlms.openflamingo import OpenFlamingoVLM
from evaluators.vlms.openflamingo_attention import (
    SdpaMaskedCrossAttention,
    SdpaPerceiverAttention,
    set_attention,
)
from tests.openflamingo_tiny import (  # noqa: F401  (the fixtures tiny and vlm)
    CAPTION,
    VQA,
    TinyFlamingo,
    images,
    package_inputs,
    tiny_fixture,
    vlm_fixture,
)


@pytest.mark.parametrize("side", ["left", "right"])
def test_token_batches_equal_the_tokenizers_own_padding(tiny: TinyFlamingo, vlm: OpenFlamingoVLM, side: str) -> None:
    texts = [CAPTION + "a red circle on a blue square<|endofchunk|>", VQA + "red<|endofchunk|>", CAPTION]
    _, want_ids, want_mask = package_inputs(tiny, images(1), texts, side)
    ids, mask = vlm._tokenize(texts, side)
    assert torch.equal(ids, want_ids) and torch.equal(mask, want_mask)
    assert len({int(m.sum()) for m in mask}) == 3, "the texts must differ in length for padding to show"


def test_an_attack_tokenises_each_text_once(vlm: OpenFlamingoVLM, monkeypatch: pytest.MonkeyPatch) -> None:
    """APGD calls the loss with the same prompts and targets at every step: their ids are memoised."""
    calls: list[str] = []
    tokenizer = vlm.tokenizer

    class Counting:
        def __getattr__(self, name: str) -> object:
            return getattr(tokenizer, name)

        def __call__(self, text: str, *args: object, **kwargs: object) -> object:
            calls.append(text)
            return tokenizer(text, *args, **kwargs)

    monkeypatch.setattr(vlm, "tokenizer", Counting())
    x = vlm.to_pixels(images(2))
    prompts, targets = [CAPTION + "two squares<|endofchunk|>\n" + CAPTION, VQA], ["a green star", "green"]
    first = vlm.loss(x, prompts, targets)
    n = len(calls)
    assert n == 4  # two prompts, two prompt + target texts
    for _ in range(2):
        torch.testing.assert_close(vlm.loss(x, prompts, targets), first, rtol=0, atol=0)
    assert len(calls) == n


def _twin(block: torch.nn.Module, fast_class: type) -> torch.nn.Module:
    """A copy of ``block`` (same weights) computed by ``fast_class``."""
    twin = type(block).__new__(type(block))
    twin.__dict__ = {**block.__dict__, "_modules": dict(block._modules), "_parameters": dict(block._parameters)}
    twin.__class__ = fast_class
    return twin


def _outputs_and_grads(block: torch.nn.Module, inputs: list[torch.Tensor], **kw: object) -> list[torch.Tensor]:
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = block(*leaves, **kw)
    weight = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    return [out, *torch.autograd.grad((out * weight).sum(), leaves)]


def test_perceiver_attention_equals_the_packages() -> None:
    torch.manual_seed(0)
    block = PerceiverAttention(dim=24, dim_head=8, heads=3).double()
    x, latents = torch.randn(2, 3, 7, 24, dtype=torch.float64), torch.randn(2, 3, 5, 24, dtype=torch.float64)
    want = _outputs_and_grads(block, [x, latents])
    got = _outputs_and_grads(_twin(block, SdpaPerceiverAttention), [x, latents])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("immediate", [True, False])
@pytest.mark.parametrize("cached", [False, True])
def test_masked_cross_attention_equals_the_packages(immediate: bool, cached: bool) -> None:
    """Two images per row; text before the first image, between them, and (row 1) after a third <image> that
    has no media (no image it may attend to), so every branch of the package's masking is compared."""
    torch.manual_seed(1)
    block = MaskedCrossAttention(dim=16, dim_visual=12, dim_head=8, heads=2, only_attend_immediate_media=immediate)
    block = block.double()
    text, media = torch.randn(2, 9, 16, dtype=torch.float64), torch.randn(2, 2, 4, 12, dtype=torch.float64)
    locations = torch.zeros(2, 9, dtype=torch.bool)
    locations[0, [2, 5]] = True
    locations[1, [0, 3, 6]] = True
    kw = {"media_locations": locations, "use_cached_media": cached}
    want = _outputs_and_grads(block, [text, media], **kw)
    got = _outputs_and_grads(_twin(block, SdpaMaskedCrossAttention), [text, media], **kw)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    if immediate and not cached:
        assert want[0][0, :2].abs().max() == 0 and want[0][0, 2:].abs().min() > 0, "text before the image is zero"


def test_the_option_swaps_every_block_and_keeps_the_function(tiny: TinyFlamingo, vlm: OpenFlamingoVLM) -> None:
    blocks = [m for m in vlm.model.modules() if isinstance(m, PerceiverAttention | MaskedCrossAttention)]
    assert blocks and all(type(m) in (PerceiverAttention, MaskedCrossAttention) for m in blocks)  # the default
    x = vlm.to_pixels(images(2)).requires_grad_(True)
    prompts, targets = ["Output:a cat<|endofchunk|>\n" + CAPTION, VQA], ["a red circle", "red"]
    slow = vlm.loss(x, prompts, targets)
    (g_slow,) = torch.autograd.grad(slow.sum(), x)
    set_attention(vlm.model, "sdpa")
    try:
        assert all(type(m) in (SdpaPerceiverAttention, SdpaMaskedCrossAttention) for m in blocks)
        fast = vlm.loss(x, prompts, targets)
        (g_fast,) = torch.autograd.grad(fast.sum(), x)
    finally:
        set_attention(vlm.model, "einsum")
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)
    # float32 rounding differs element by element; the pixel gradient as a whole agrees to 1e-5
    assert float((g_fast - g_slow).norm() / g_slow.norm()) < 1e-5
    sdpa = OpenFlamingoVLM.from_pretrained(**tiny.kwargs(attention="sdpa"))
    assert any(isinstance(m, SdpaPerceiverAttention) for m in sdpa.modules())
    torch.testing.assert_close(sdpa.loss(x.detach(), prompts, targets), slow.detach(), rtol=1e-5, atol=1e-6)
    decoding = dict(num_beams=2, max_new_tokens=5, min_new_tokens=2)  # generation reads the cached media
    assert sdpa.generate(x.detach(), prompts, **decoding) == vlm.generate(x.detach(), prompts, **decoding)
    with pytest.raises(ConfigError, match="vlm.attention must be one of einsum, sdpa"):
        OpenFlamingoVLM.from_pretrained(**tiny.kwargs(attention="flash"))
