"""diffcap.unet / load_guided_diffusion against guided-diffusion's parameter layout and computation.

The expected key list and the functional forward below are written here, independently of
diffcap/unet.py, from guided-diffusion's construction rules (openai/guided-diffusion,
guided_diffusion/unet.py UNetModel / ResBlock / AttentionBlock / QKVAttentionLegacy, nn.py
timestep_embedding / GroupNorm32). The real 256x256 numbers (566 tensors, 552,814,086 parameters) were
checked once against guided-diffusion's own create_model on the meta device.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from diffcap.denoisers import Denoiser, load_guided_diffusion
from diffcap.unet import GUIDED_DIFFUSION_256_UNCOND_FLAGS, UNetModel
from diffcap.unet_blocks import GroupNorm32

# ---------------------------------------------------------------- expected state-dict layout


def expected_layout(
    image_size: int,
    ch: int,
    n_res: int,
    mult: tuple[int, ...],
    attn_res: tuple[int, ...],
    learn_sigma: bool,
    scale_shift: bool = True,
    updown: bool = True,
) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    temb = 4 * ch

    def linear(p: str, i: int, o: int) -> None:
        out[f"{p}.weight"], out[f"{p}.bias"] = (o, i), (o,)

    def conv(p: str, i: int, o: int, k: int, dims: int = 2) -> None:
        out[f"{p}.weight"], out[f"{p}.bias"] = (o, i, *([k] * dims)), (o,)

    def norm(p: str, c: int) -> None:
        out[f"{p}.weight"], out[f"{p}.bias"] = (c,), (c,)

    def res(p: str, i: int, o: int) -> None:
        norm(f"{p}.in_layers.0", i)
        conv(f"{p}.in_layers.2", i, o, 3)
        linear(f"{p}.emb_layers.1", temb, 2 * o if scale_shift else o)
        norm(f"{p}.out_layers.0", o)
        conv(f"{p}.out_layers.3", o, o, 3)
        if i != o:
            conv(f"{p}.skip_connection", i, o, 1)

    def attn(p: str, c: int) -> None:
        norm(f"{p}.norm", c)
        conv(f"{p}.qkv", c, 3 * c, 1, dims=1)
        conv(f"{p}.proj_out", c, c, 1, dims=1)

    linear("time_embed.0", ch, temb)
    linear("time_embed.2", temb, temb)
    conv("input_blocks.0.0", 3, ch * mult[0], 3)
    chans, cur, res_px, n = [ch * mult[0]], ch * mult[0], image_size, 1
    for level, m in enumerate(mult):
        for _ in range(n_res):
            res(f"input_blocks.{n}.0", cur, ch * m)
            cur = ch * m
            if res_px in attn_res:
                attn(f"input_blocks.{n}.1", cur)
            chans.append(cur)
            n += 1
        if level < len(mult) - 1:
            if updown:
                res(f"input_blocks.{n}.0", cur, cur)
            else:
                conv(f"input_blocks.{n}.0.op", cur, cur, 3)
            chans.append(cur)
            res_px //= 2
            n += 1
    res("middle_block.0", cur, cur)
    attn("middle_block.1", cur)
    res("middle_block.2", cur, cur)
    n = 0
    for level in reversed(range(len(mult))):
        for i in range(n_res + 1):
            res(f"output_blocks.{n}.0", cur + chans.pop(), ch * mult[level])
            cur = ch * mult[level]
            j = 1
            if res_px in attn_res:
                attn(f"output_blocks.{n}.1", cur)
                j = 2
            if level > 0 and i == n_res:
                if updown:
                    res(f"output_blocks.{n}.{j}", cur, cur)
                else:
                    conv(f"output_blocks.{n}.{j}.conv", cur, cur, 3)
                res_px *= 2
            n += 1
    norm("out.0", cur)
    conv("out.2", ch * mult[0], 6 if learn_sigma else 3, 3)
    return out


def test_real_256_layout_matches_guided_diffusion():
    f = GUIDED_DIFFUSION_256_UNCOND_FLAGS
    want = expected_layout(256, 256, 2, (1, 1, 2, 2, 4, 4), (32, 16, 8), learn_sigma=True)
    with torch.device("meta"):  # 553 M parameters: no memory, no init time
        model = UNetModel(**f)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == want
    assert len(got) == 566
    assert sum(math.prod(s) for s in got.values()) == 552_814_086
    # anchors checked against guided-diffusion's own create_model (meta device)
    assert got["out.2.weight"] == (6, 256, 3, 3)
    assert got["middle_block.1.qkv.weight"] == (3072, 1024, 1)
    assert got["input_blocks.1.0.emb_layers.1.weight"] == (512, 1024)
    assert got["output_blocks.0.0.skip_connection.weight"] == (1024, 2048, 1, 1)
    # legacy attention order and 64 channels per head
    assert model.middle_block[1].num_heads == 1024 // 64 and not model.middle_block[1].new_order


def test_layout_without_updown_or_scale_shift():
    model = UNetModel(
        image_size=32, num_channels=32, num_res_blocks=1, channel_mult=(1, 2), attention_resolutions="16"
    )
    want = expected_layout(32, 32, 1, (1, 2), (16,), False, scale_shift=False, updown=False)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == want


# ---------------------------------------------------------------- independent functional forward

SMALL = dict(
    image_size=32,
    num_channels=32,
    num_res_blocks=2,
    channel_mult=(1, 2, 2),
    attention_resolutions=(16, 8),
    learn_sigma=True,
    num_head_channels=8,
    num_heads=4,
    use_scale_shift_norm=True,
    resblock_updown=True,
    use_fp16=False,
)


def functional_forward(sd: dict[str, torch.Tensor], x: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """guided-diffusion's UNet forward for SMALL-like flags (scale-shift norm, resblock up/down)."""
    ch, head_ch = SMALL["num_channels"], SMALL["num_head_channels"]

    def gn(h, p):
        return F.group_norm(h, 32, sd[p + ".weight"], sd[p + ".bias"], eps=1e-5)

    def conv(h, p):
        w = sd[p + ".weight"]
        return F.conv2d(h, w, sd[p + ".bias"], padding=w.shape[-1] // 2)

    def resblock(h, emb, p, resample=None):
        a = F.silu(gn(h, p + ".in_layers.0"))
        if resample == "down":
            a, h = F.avg_pool2d(a, 2), F.avg_pool2d(h, 2)
        elif resample == "up":
            a, h = F.interpolate(a, scale_factor=2.0), F.interpolate(h, scale_factor=2.0)
        a = conv(a, p + ".in_layers.2")
        e = F.linear(F.silu(emb), sd[p + ".emb_layers.1.weight"], sd[p + ".emb_layers.1.bias"])
        o = a.shape[1]
        scale, shift = e[:, :o, None, None], e[:, o:, None, None]
        a = gn(a, p + ".out_layers.0") * (1 + scale) + shift
        a = conv(F.silu(a), p + ".out_layers.3")
        skip = conv(h, p + ".skip_connection") if p + ".skip_connection.weight" in sd else h
        return skip + a

    def attention(h, p):
        b, c, hh, ww = h.shape
        flat = h.reshape(b, c, hh * ww)
        normed = F.group_norm(flat, 32, sd[p + ".norm.weight"], sd[p + ".norm.bias"], eps=1e-5)
        qkv = F.conv1d(normed, sd[p + ".qkv.weight"], sd[p + ".qkv.bias"])
        heads = c // head_ch
        # legacy order: each head owns a contiguous [q; k; v] block of 3 * head_ch rows
        qkv = qkv.reshape(b, heads, 3, head_ch, hh * ww)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        w = torch.softmax(torch.einsum("bnct,bncs->bnts", q, k) / math.sqrt(head_ch), dim=-1)
        a = torch.einsum("bnts,bncs->bnct", w, v).reshape(b, c, hh * ww)
        a = F.conv1d(a, sd[p + ".proj_out.weight"], sd[p + ".proj_out.bias"])
        return (flat + a).reshape(b, c, hh, ww)

    def block(h, emb, p):
        """Run every layer stored under prefix p ("input_blocks.3" ...), deciding each from its keys."""
        j = 0
        while any(k.startswith(f"{p}.{j}.") for k in sd):
            q = f"{p}.{j}"
            if q + ".qkv.weight" in sd:
                h = attention(h, q)
            elif j > 0 or q + ".in_layers.0.weight" in sd:
                resample = None
                if j > 0:  # a ResBlock after the first layer is the up-sampler
                    resample = "up"
                elif p.startswith("input_blocks") and int(p.split(".")[1]) in down_ids:
                    resample = "down"
                h = resblock(h, emb, q, resample)
            j += 1
        return h

    half = ch // 2
    freqs = 10000.0 ** (-torch.arange(half, dtype=torch.float32) / half)
    ang = steps.float()[:, None] * freqs[None]
    emb = torch.cat([ang.cos(), ang.sin()], dim=1)
    emb = F.linear(F.silu(F.linear(emb, sd["time_embed.0.weight"], sd["time_embed.0.bias"])),
                   sd["time_embed.2.weight"], sd["time_embed.2.bias"])  # fmt: skip

    n_res, n_levels = SMALL["num_res_blocks"], len(SMALL["channel_mult"])
    down_ids = {(n_res + 1) * (lvl + 1) for lvl in range(n_levels - 1)}
    n_in = 1 + n_res * n_levels + (n_levels - 1)
    h = conv(x, "input_blocks.0.0")
    skips = [h]
    for i in range(1, n_in):
        h = block(h, emb, f"input_blocks.{i}")
        skips.append(h)
    h = resblock(h, emb, "middle_block.0")
    h = attention(h, "middle_block.1")
    h = resblock(h, emb, "middle_block.2")
    for i in range((n_res + 1) * n_levels):
        h = block(torch.cat([h, skips.pop()], dim=1), emb, f"output_blocks.{i}")
    return conv(F.silu(gn(h, "out.0")), "out.2")


def random_state_dict(flags: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights everywhere (the zero-initialised convs too, so every path matters)."""
    g = torch.Generator().manual_seed(seed)
    sd = UNetModel(**flags).state_dict()
    out = {}
    for k, v in sd.items():
        if ".norm" in k or "_layers.0." in k or k.startswith("out.0"):
            base = 1.0 if k.endswith("weight") else 0.0
            out[k] = base + 0.1 * torch.randn(v.shape, generator=g)
        else:
            fan_in = max(1, v[0].numel()) if v.ndim > 1 else 16
            out[k] = torch.randn(v.shape, generator=g) / math.sqrt(fan_in)
    return out


def _overrides() -> dict:
    return {k: v for k, v in SMALL.items() if GUIDED_DIFFUSION_256_UNCOND_FLAGS.get(k) != v}


def test_small_checkpoint_loads_strictly_and_matches_functional_forward(tmp_path):
    sd = random_state_dict(SMALL)
    path = tmp_path / "small_gd.pt"
    torch.save(sd, path)  # a plain dict of tensors, like the real release file
    den = load_guided_diffusion(path, dtype="float32", **_overrides())
    assert isinstance(den, Denoiser) and den.resolution == 32 and den.learn_sigma
    assert not any(p.requires_grad for p in den.parameters())
    g = torch.Generator().manual_seed(1)
    x = torch.randn((2, 3, 32, 32), generator=g).clamp(-1, 1)
    t = torch.tensor([0.1234, 0.9])  # -> discrete steps 123 and 900 (DiffPure's floor(1000 t))
    with torch.no_grad():
        eps = den(x, t)
        ref = functional_forward(sd, x, torch.tensor([123, 900]))
    assert eps.shape == (2, 3, 32, 32) and ref.shape == (2, 6, 32, 32)
    assert ref[:, :3].abs().mean() > 0.05  # a non-trivial output, so the comparison means something
    torch.testing.assert_close(eps, ref[:, :3], atol=1e-5, rtol=1e-5)
    # a different time must change the prediction (the embedding is wired in)
    with torch.no_grad():
        assert (den(x, torch.tensor([0.5, 0.9]))[0] - eps[0]).abs().max() > 1e-3


def test_fp16_torso_close_to_fp32(tmp_path):
    sd = random_state_dict(SMALL, seed=3)
    path = tmp_path / "small_gd.pt"
    torch.save(sd, path)
    den32 = load_guided_diffusion(path, dtype="float32", **_overrides())
    den16 = load_guided_diffusion(path, dtype=torch.float16, **_overrides())
    assert den16.unet.torso_dtype == torch.float16
    assert den16.unet.time_embed[0].weight.dtype == torch.float32  # like convert_to_fp16: convs only
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        a, b = den32(x, 0.3), den16(x, 0.3)
    assert b.dtype == torch.float32
    assert (a - b).abs().max() < 0.05 * a.abs().max()


def test_groupnorm_computes_in_float32_under_fp16():
    """guided-diffusion's GroupNorm32: normalise in float32, cast back. In float16 the statistics of a
    feature map with a large mean lose precision, so the outputs differ from the float32 ones."""
    g = torch.Generator().manual_seed(0)
    gn = GroupNorm32(32, 64)
    with torch.no_grad():
        gn.weight.copy_(torch.rand(64, generator=g) + 0.5)
        gn.bias.copy_(torch.randn(64, generator=g))
    x = (30 + 0.1 * torch.randn(2, 64, 8, 8, generator=g)).half()
    y = gn(x)
    assert y.dtype == torch.float16
    want = F.group_norm(x.float(), 32, gn.weight, gn.bias, gn.eps).half()
    assert torch.equal(y, want)
    assert not torch.equal(F.group_norm(x, 32, gn.weight.half(), gn.bias.half(), gn.eps), want)


def test_wrong_layout_fails_strictly(tmp_path):
    sd = random_state_dict(SMALL)
    sd.pop("middle_block.1.qkv.bias")
    path = tmp_path / "broken.pt"
    torch.save(sd, path)
    with pytest.raises(RuntimeError, match="qkv.bias"):
        load_guided_diffusion(path, dtype="float32", **_overrides())
    with pytest.raises(TypeError, match="not_a_flag"):
        load_guided_diffusion(path, not_a_flag=1)


def test_missing_checkpoint_is_one_clear_line(tmp_path):
    path = tmp_path / "nowhere" / "256x256_diffusion_uncond.pt"
    with pytest.raises(FileNotFoundError) as err:
        load_guided_diffusion(path)
    msg = str(err.value)
    assert "\n" not in msg
    for part in (str(path), "256x256_diffusion_uncond.pt", "2.2 GB", "openai/guided-diffusion", "sha256"):
        assert part in msg
