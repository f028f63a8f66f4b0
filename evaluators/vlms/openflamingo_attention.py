"""OpenFlamingo's two attention blocks computed with PyTorch's scaled-dot-product attention (config
``vlm.attention=sdpa``; ``einsum`` keeps open_flamingo's own code).

open_flamingo writes the perceiver's and the gated cross-attention's attention as einsums over rearranged
(b, h, t, n, d) views, with ``to_kv(...).chunk(2)``: each call copies q, k and v into bmm layouts, keeps the full
similarity matrix, subtracts its row maximum in a separate pass, and the backward pass concatenates the k and v
gradients again (about a fifth of a batched APGD step of the tiny OpenFlamingo on the CPU, profiled). The same
function here: k and v from the two halves of ``to_kv``'s
weight, the softmax scale folded into ``to_q``'s weight, one ``F.scaled_dot_product_attention`` call. Outputs
and gradients equal the package's within float32 rounding (tests/test_vlm_openflamingo.py), the masked
cross-attention's edge cases included: text before any image gets zero output when only the immediate image is
attended (the package zeroes it), and a text token with no image it may attend to gets the uniform average of
the values with no gradient to its query (what the package's fill with the most negative float gives).
Off by default: on the project's CPU it was faster at batch 1 but not in every repeat at batch 16 (README
"Performance"); a GPU has not measured it yet.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_flamingo.src.helpers import MaskedCrossAttention, PerceiverAttention
from torch import nn

ATTENTION = ("einsum", "sdpa")


def _heads(z: torch.Tensor, heads: int) -> torch.Tensor:
    """(..., n, heads * d) -> (..., heads, n, d), a view."""
    return z.unflatten(-1, (heads, -1)).transpose(-2, -3)


def _merge(z: torch.Tensor) -> torch.Tensor:
    """(..., heads, n, d) -> (..., n, heads * d)."""
    return z.transpose(-2, -3).flatten(-2)


def _q_k_v(block: nn.Module, queries: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Scaled q from ``to_q``, k and v from the two halves of ``to_kv``'s weight, split into heads."""
    inner = block.to_q.weight.shape[0]
    kv = block.to_kv.weight
    q = F.linear(queries, block.to_q.weight * block.scale)
    return tuple(_heads(z, block.heads) for z in (q, F.linear(keys, kv[:inner]), F.linear(keys, kv[inner:])))


class SdpaPerceiverAttention(PerceiverAttention):
    """open_flamingo's ``PerceiverAttention`` (latents attend to the image features and themselves)."""

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x, latents = self.norm_media(x), self.norm_latents(latents)
        q, k, v = _q_k_v(self, latents, torch.cat((x, latents), dim=-2))
        return self.to_out(_merge(F.scaled_dot_product_attention(q, k, v, scale=1.0)))


class SdpaMaskedCrossAttention(MaskedCrossAttention):
    """open_flamingo's ``MaskedCrossAttention`` (text attends to the latents of its image(s))."""

    def forward(self, x: torch.Tensor, media: torch.Tensor, media_locations: torch.Tensor | None = None,
                use_cached_media: bool = False) -> torch.Tensor:
        if not use_cached_media and media_locations is not None and media_locations.shape[1] != x.shape[1]:
            raise ValueError(f"media_locations has {media_locations.shape[1]} positions, the text {x.shape[1]}")
        n_media, n_latents = media.shape[1:3]
        q, k, v = _q_k_v(self, self.norm(x), media.flatten(1, 2))
        if media_locations is None:
            return self.to_out(_merge(F.scaled_dot_product_attention(q, k, v, scale=1.0)))
        if use_cached_media:  # every text token comes after the last image seen
            text_time = torch.count_nonzero(media_locations, dim=1)[:, None].expand(-1, x.shape[1])
        else:
            text_time = media_locations.cumsum(dim=-1)
        media_time = torch.arange(1, n_media + 1, device=x.device).repeat_interleave(n_latents)
        same = torch.eq if self.only_attend_immediate_media else torch.ge
        allowed = same(text_time[:, None, :, None], media_time)  # (b, 1, text, media tokens)
        some = allowed.any(-1, keepdim=True)
        # rows with no allowed image: uniform attention and no gradient to q, as the package's fill gives
        out = F.scaled_dot_product_attention(q * some, k, v, attn_mask=allowed | ~some, scale=1.0)
        if self.only_attend_immediate_media:
            out = out.masked_fill((text_time == 0)[:, None, :, None], 0.0)
        return self.to_out(_merge(out))


def set_attention(model: nn.Module, attention: str) -> None:
    """Compute every perceiver and cross-attention block of ``model`` with ``attention`` (in place: the
    blocks' classes change, their weights and names stay)."""
    if attention not in ATTENTION:
        raise ValueError(f"vlm.attention must be one of {', '.join(ATTENTION)}, got {attention!r}")
    fast = attention == "sdpa"
    for m in model.modules():
        if isinstance(m, PerceiverAttention):
            m.__class__ = SdpaPerceiverAttention if fast else PerceiverAttention
        elif isinstance(m, MaskedCrossAttention):
            m.__class__ = SdpaMaskedCrossAttention if fast else MaskedCrossAttention
