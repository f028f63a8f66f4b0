"""Start the tiny LLaVA's and the tiny OpenFlamingo's vision towers from the trained tiny CLIP's vision tower,
as the real models start from a contrastively pretrained CLIP (LLaVA-1.5: CLIP ViT-L/14-336; OpenFlamingo:
CLIP ViT-L/14 through open_clip).

The geometries differ from the tiny CLIP's (56 px, patch 8, a 7 x 7 grid): LLaVA sees 84 px with patch 12
(the same 7 x 7 grid, so only the patch kernel is resized), OpenFlamingo sees 56 px with patch 7 (an 8 x 8
grid: the kernel is resized and the grid of position embeddings interpolated). Kernels are resized by the
pseudo-inverse of the bilinear resize (FlexiViT's "PI-resize"): exact for the upsampled LLaVA patches, a
least-squares fit for the OpenFlamingo ones. Everything else (attention, MLPs, layer norms, class token,
projection) is copied unchanged; open_clip's fused q/k/v projection is the concatenation of HF's three.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F


def clip_vision_state(folder: Path) -> dict[str, torch.Tensor]:
    """The ``vision_model.*`` and ``visual_projection`` weights of a saved ``CLIPModel``."""
    from safetensors.torch import load_file

    state = load_file(str(folder / "model.safetensors"))
    return {k: v for k, v in state.items() if k.startswith(("vision_model.", "visual_projection."))}


def pi_resize_kernel(w: torch.Tensor, size: int) -> torch.Tensor:
    """(O, C, k, k) patch kernel -> (O, C, size, size) whose response to a bilinearly resized patch matches
    the original response to the patch (least squares when shrinking)."""
    k = w.shape[-1]
    basis = torch.eye(k * k, dtype=torch.float64).view(k * k, 1, k, k)
    resize = F.interpolate(basis, size=(size, size), mode="bilinear", align_corners=False).view(k * k, size * size)
    # resize: row i = the resized basis patch e_i; want w_new . (R^T x) = w . x for all x -> R w_new = w
    flat = w.to(torch.float64).reshape(-1, k * k).T  # (k*k, O*C)
    new = torch.linalg.pinv(resize) @ flat  # (size*size, O*C)
    return new.T.reshape(*w.shape[:2], size, size).to(w.dtype)


def interpolate_positions(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """(1 + g*g, D) position embeddings (class token first) -> (1 + grid*grid, D), bicubic on the grid."""
    g = int(round((pos.shape[0] - 1) ** 0.5))
    if g == grid:
        return pos.clone()
    patch = pos[1:].T.reshape(1, -1, g, g)
    patch = F.interpolate(patch, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([pos[:1], patch.reshape(pos.shape[1], -1).T], dim=0)


def init_llava_tower(model, clip_folder: Path) -> None:
    """Copy the tiny CLIP's vision tower into a ``LlavaForConditionalGeneration``'s (PI-resized kernel)."""
    src = clip_vision_state(clip_folder)
    tower = model.vision_tower
    target = tower.state_dict()
    new = {}
    for k, v in target.items():
        w = src[k]
        if k.endswith("patch_embedding.weight"):
            w = pi_resize_kernel(w, v.shape[-1])
        elif k.endswith("position_embedding.weight"):
            w = interpolate_positions(w, int(round((v.shape[0] - 1) ** 0.5)))
        if w.shape != v.shape:
            raise ValueError(f"{k}: tiny CLIP has {tuple(w.shape)}, the LLaVA tower needs {tuple(v.shape)}")
        new[k] = w
    tower.load_state_dict(new)


def hf_to_open_clip_visual(src: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """HF ``CLIPModel`` vision weights renamed to open_clip's ``VisionTransformer`` names (same geometry)."""
    p = "vision_model."
    out = {"conv1.weight": src[p + "embeddings.patch_embedding.weight"],
           "class_embedding": src[p + "embeddings.class_embedding"],
           "positional_embedding": src[p + "embeddings.position_embedding.weight"],
           "proj": src["visual_projection.weight"].T.contiguous()}
    for ours, theirs in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
        for t in ("weight", "bias"):
            out[f"{ours}.{t}"] = src[f"{p}{theirs}.{t}"]
    for i in range(layers):
        h, o = f"{p}encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for t in ("weight", "bias"):
            out[f"{o}attn.in_proj_{t}"] = torch.cat([src[f"{h}self_attn.{q}_proj.{t}"] for q in "qkv"])
            for ours, theirs in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"),
                                 ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                out[f"{o}{ours}.{t}"] = src[f"{h}{theirs}.{t}"]
    return out


def init_openflamingo_tower(model, clip_folder: Path) -> None:
    """Copy the tiny CLIP's vision tower into OpenFlamingo's open_clip tower (kernel PI-resized, positions
    interpolated to its grid)."""
    target = model.vision_encoder.state_dict()
    layers = len(model.vision_encoder.transformer.resblocks)
    new = hf_to_open_clip_visual(clip_vision_state(clip_folder), layers)
    new["conv1.weight"] = pi_resize_kernel(new["conv1.weight"], target["conv1.weight"].shape[-1])
    new["positional_embedding"] = interpolate_positions(
        new["positional_embedding"], int(round((target["positional_embedding"].shape[0] - 1) ** 0.5)))
    for k, v in target.items():
        if k not in new or new[k].shape != v.shape:
            got = tuple(new[k].shape) if k in new else "nothing"
            raise ValueError(f"{k}: tiny CLIP gives {got}, the OpenFlamingo tower needs {tuple(v.shape)}")
    model.vision_encoder.load_state_dict(new)
