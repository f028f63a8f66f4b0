"""A UNet whose state dict is interchangeable with OpenAI guided-diffusion's ``UNetModel``.

Why: DiffPure (and DiffCAP after it) denoise with guided-diffusion's ``256x256_diffusion_uncond.pt``,
a plain state dict. Loading it unmodified needs a module with exactly the same parameter names,
shapes and computation. This module (with its blocks in ``diffcap/unet_blocks.py``) is written from
scratch; the facts below were read from
openai/guided-diffusion (commit 22e0df8) and checked by ``tests/test_unet_loading.py``:

- ``guided_diffusion/unet.py`` ``UNetModel.__init__``: ``time_embed.{0,2}`` (Linear C->4C, SiLU,
  Linear 4C->4C); ``input_blocks.0.0`` (3x3 conv 3->C*mult[0]); per level ``num_res_blocks`` entries
  ``input_blocks.N`` = ResBlock (+ AttentionBlock at index 1 when the downsample rate is listed), then,
  except on the last level, one down-sampling entry ``input_blocks.N.0`` (a ResBlock with ``down`` when
  ``resblock_updown``, else ``Downsample.op``); ``middle_block.{0,1,2}`` = ResBlock, AttentionBlock,
  ResBlock; ``output_blocks.N`` over levels in reverse with ``num_res_blocks + 1`` entries each, input
  channels ``ch + skip``, AttentionBlock at index 1 when listed, and on every level but the first an
  up-sampling layer appended after the last entry (ResBlock ``up`` or ``Upsample.conv``);
  ``out.{0,2}`` = GroupNorm over the last ``ch``, SiLU, 3x3 conv from ``C*mult[0]`` to 3 or 6 channels.
- ``unet.py`` ``ResBlock``: ``in_layers.{0,2}`` (GroupNorm, SiLU, 3x3 conv), ``emb_layers.1`` (SiLU,
  Linear to 2*out when ``use_scale_shift_norm``), ``out_layers.{0,3}`` (GroupNorm, SiLU, Dropout,
  zero-initialised 3x3 conv), ``skip_connection`` (Identity, else 1x1 conv, or 3x3 if ``use_conv``).
  Up/down blocks resample (nearest x2 / 2x2 average pool) after ``in_layers``' SiLU and before its
  conv, and resample the skip path the same way. Scale-shift: ``norm(h) * (1 + scale) + shift`` with
  ``scale, shift = chunk(emb, 2)``.
- ``unet.py`` ``AttentionBlock``: ``norm`` (GroupNorm), ``qkv`` (Conv1d C->3C, kernel 1), ``proj_out``
  (zero-initialised Conv1d C->C); heads = C // num_head_channels, else ``num_heads``.
  ``QKVAttentionLegacy`` splits heads first, then q, k, v (``reshape(B*H, 3*ch, T).split(ch)``);
  ``QKVAttention`` (``use_new_attention_order``) splits q, k, v first. Both scale q and k by
  ``ch ** -0.25`` each and take the softmax in float32.
- ``guided_diffusion/nn.py``: ``GroupNorm32`` is GroupNorm(32, C) computed in float32 and cast back;
  ``timestep_embedding`` is ``cat([cos(t f), sin(t f)])`` with ``f_i = exp(-ln(10000) i / half)``.
- ``guided_diffusion/script_util.py`` ``create_model``: ``attention_resolutions`` are image
  resolutions turned into downsample rates ``image_size // res``; default ``channel_mult`` for 256 is
  (1, 1, 2, 2, 4, 4); ``out_channels`` 6 with ``learn_sigma``; 1000 classes with ``class_cond``.
- ``guided_diffusion/fp16_util.py`` ``convert_module_to_f16`` (applied by ``convert_to_fp16`` to
  input_blocks, middle_block and output_blocks only) casts conv weights and biases only; Linear and
  GroupNorm stay float32, which is what ``torso_dtype`` below reproduces.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from diffcap.unet_blocks import (
    ATTENTION_IMPLS,
    AttentionBlock,
    Downsample,
    ResBlock,
    TimestepEmbedSequential,
    Upsample,
    _norm,
    _zeroed,
    timestep_embedding,
)

# Default channel multipliers per image size, as guided-diffusion's create_model picks them.
DEFAULT_CHANNEL_MULT: dict[int, tuple[float, ...]] = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
}

#: The flags of ``256x256_diffusion_uncond.pt`` (guided-diffusion README / DiffPure configs/imagenet.yml).
GUIDED_DIFFUSION_256_UNCOND_FLAGS: dict[str, Any] = {
    "image_size": 256,
    "num_channels": 256,
    "num_res_blocks": 2,
    "channel_mult": (1, 1, 2, 2, 4, 4),
    "attention_resolutions": (32, 16, 8),
    "learn_sigma": True,
    "class_cond": False,
    "num_heads": 4,
    "num_head_channels": 64,
    "num_heads_upsample": -1,
    "use_scale_shift_norm": True,
    "resblock_updown": True,
    "use_fp16": True,
    "use_new_attention_order": False,
    "dropout": 0.0,
}


def parse_int_list(value: str | int | Sequence[int | float]) -> tuple[int, ...]:
    """Accept guided-diffusion's comma strings ("32,16,8") as well as sequences."""
    if isinstance(value, str):
        return tuple(int(v) for v in value.replace(" ", "").split(",") if v)
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


class UNetModel(nn.Module):
    """guided-diffusion's UNet, built from the same flags as its ``create_model``.

    ``attention_resolutions`` are image resolutions (e.g. "32,16,8"); ``channel_mult`` empty means the
    default for ``image_size``. ``forward(x, timesteps, y=None)`` takes the discrete timestep index
    (float allowed) and returns ``out_channels`` maps (6 with ``learn_sigma``: eps then variance).
    ``use_fp16`` only records the original flag; the torso precision is set with ``torso_dtype``
    (float16 reproduces guided-diffusion's ``convert_to_fp16``).
    """

    def __init__(
        self,
        image_size: int = 64,
        num_channels: int = 128,
        num_res_blocks: int = 2,
        channel_mult: str | Sequence[float] = "",
        attention_resolutions: str | Sequence[int] = "16,8",
        learn_sigma: bool = False,
        class_cond: bool = False,
        num_classes: int = 1000,
        num_heads: int = 1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_fp16: bool = False,
        use_new_attention_order: bool = False,
        dropout: float = 0.0,
        use_checkpoint: bool = False,
        conv_resample: bool = True,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if channel_mult in ("", None, ()):
            if image_size not in DEFAULT_CHANNEL_MULT:
                raise ValueError(f"no default channel_mult for image_size {image_size}; pass one")
            mult = DEFAULT_CHANNEL_MULT[image_size]
        elif isinstance(channel_mult, str):
            mult = tuple(float(m) for m in channel_mult.split(","))
        else:
            mult = tuple(channel_mult)
        mult = tuple(int(m) if float(m).is_integer() else float(m) for m in mult)
        attn_res = parse_int_list(attention_resolutions)
        self.flags: dict[str, Any] = {
            "image_size": image_size,
            "num_channels": num_channels,
            "num_res_blocks": num_res_blocks,
            "channel_mult": list(mult),
            "attention_resolutions": list(attn_res),
            "learn_sigma": learn_sigma,
            "class_cond": class_cond,
            "num_classes": num_classes,
            "num_heads": num_heads,
            "num_head_channels": num_head_channels,
            "num_heads_upsample": num_heads_upsample,
            "use_scale_shift_norm": use_scale_shift_norm,
            "resblock_updown": resblock_updown,
            "use_fp16": use_fp16,
            "use_new_attention_order": use_new_attention_order,
            "dropout": dropout,
            "use_checkpoint": use_checkpoint,
            "conv_resample": conv_resample,
            "in_channels": in_channels,
        }
        self.image_size = image_size
        self.model_channels = num_channels
        self.in_channels = in_channels
        self.out_channels = 6 if learn_sigma else 3
        self.learn_sigma = learn_sigma
        self.num_classes = num_classes if class_cond else None
        attn_ds = {image_size // r for r in attn_res}
        heads_up = num_heads if num_heads_upsample == -1 else num_heads_upsample
        temb = num_channels * 4

        def res(ch_in: int, ch_out: int | None = None, **kw: bool) -> ResBlock:
            return ResBlock(
                ch_in,
                temb,
                dropout,
                out_channels=ch_out,
                use_scale_shift_norm=use_scale_shift_norm,
                use_checkpoint=use_checkpoint,
                **kw,
            )

        def attn(ch: int, heads: int) -> AttentionBlock:
            return AttentionBlock(
                ch,
                num_heads=heads,
                num_head_channels=num_head_channels,
                use_checkpoint=use_checkpoint,
                use_new_attention_order=use_new_attention_order,
            )

        self.time_embed = nn.Sequential(nn.Linear(num_channels, temb), nn.SiLU(), nn.Linear(temb, temb))
        if self.num_classes is not None:
            self.label_emb = nn.Embedding(self.num_classes, temb)

        ch = first_ch = int(mult[0] * num_channels)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        skip_chans = [ch]
        ds = 1
        for level, m in enumerate(mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res(ch, int(m * num_channels))]
                ch = int(m * num_channels)
                if ds in attn_ds:
                    layers.append(attn(ch, num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level < len(mult) - 1:
                down = res(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample, ch)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(res(ch), attn(ch, num_heads), res(ch))

        self.output_blocks = nn.ModuleList()
        for level in reversed(range(len(mult))):
            m = mult[level]
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skip_chans.pop(), int(m * num_channels))]
                ch = int(m * num_channels)
                if ds in attn_ds:
                    layers.append(attn(ch, heads_up))
                if level > 0 and i == num_res_blocks:
                    layers.append(
                        res(ch, ch, up=True) if resblock_updown else Upsample(ch, conv_resample, ch)
                    )
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            _norm(ch), nn.SiLU(), _zeroed(nn.Conv2d(first_ch, self.out_channels, 3, padding=1))
        )

    @property
    def torso_dtype(self) -> torch.dtype:
        """dtype of the convolutions in input/middle/output blocks (float16 after ``set_torso_dtype``)."""
        return self.input_blocks[0][0].weight.dtype

    def set_torso_dtype(self, dtype: torch.dtype) -> UNetModel:
        """Cast conv weights of the torso only, as guided-diffusion's ``convert_to_fp16`` does."""
        for part in (self.input_blocks, self.middle_block, self.output_blocks):
            for mod in part.modules():
                if isinstance(mod, nn.Conv1d | nn.Conv2d):
                    mod.to(dtype)
        return self

    def set_attention(self, impl: str) -> UNetModel:
        """Attention kernel of every AttentionBlock: "einsum" (guided-diffusion's) or "sdpa" (PyTorch's
        ``scaled_dot_product_attention``, the same function with fused kernels where the hardware has them)."""
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"denoiser.attention must be one of {', '.join(ATTENTION_IMPLS)}, got {impl!r}")
        for mod in self.modules():
            if isinstance(mod, AttentionBlock):
                mod.impl = impl
        return self

    def forward(self, x: Tensor, timesteps: Tensor, y: Tensor | None = None) -> Tensor:
        if (y is None) != (self.num_classes is None):
            raise ValueError("pass y exactly when the model is class-conditional")
        emb = self.time_embed(
            timestep_embedding(timesteps, self.model_channels).to(self.time_embed[0].weight.dtype)
        )
        if y is not None:
            emb = emb + self.label_emb(y)
        h = x.to(self.torso_dtype)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h.to(x.dtype))
