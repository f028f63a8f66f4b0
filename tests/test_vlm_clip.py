"""CLIPVLM from a tiny transformers CLIP folder (openai/clip-vit-base-patch32 layout) and from a tiny open_clip
model config + state dict, each loaded through the user's path and checked against the library's own pipeline."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from evaluators.errors import ConfigError
from evaluators.vlms.base import CheckpointError
from evaluators.vlms.clip import CLIPVLM
from tests.test_vlm_llava import SMALL_WORLD, run_py, shapes_env  # noqa: F401 (fixture)
from tests.tiny_checkpoints import make_tiny_clip_hf, make_tiny_open_clip

CLASSES = ["circle", "square", "triangle"]
TEMPLATES = ["a photo of a {}.", "a drawing of a {}.", "a big {}."]


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    return make_tiny_clip_hf(tmp_path_factory.mktemp("clip") / "tiny-clip-vit-base-patch32")


@pytest.fixture(scope="module")
def oc_files(tmp_path_factory) -> tuple[Path, Path]:
    return make_tiny_open_clip(tmp_path_factory.mktemp("open_clip"))


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(3)
    return [Image.fromarray(rng.integers(0, 256, (40, 70, 3), dtype=np.uint8)),
            Image.fromarray(rng.integers(0, 256, (50, 30, 3), dtype=np.uint8))]


def test_transformers_clip_matches_its_own_pipeline(hf_folder):
    from transformers import AutoProcessor, CLIPModel

    vlm = CLIPVLM.load(path=hf_folder)
    assert vlm.resolution == 32 and vlm.tasks == ("classification",) and vlm.family == "clip"
    model, proc = CLIPModel.from_pretrained(hf_folder), AutoProcessor.from_pretrained(hf_folder, use_fast=False)
    x = vlm.to_pixels(_images())
    ref_pv = proc(images=_images(), return_tensors="pt")["pixel_values"]
    assert x.shape == (2, 3, 32, 32) and 0 <= x.min() and x.max() <= 1
    assert torch.allclose(vlm._pixel_values(x), ref_pv, atol=1e-5)  # normalised once, the processor's way
    img = F.normalize(model.get_image_features(pixel_values=ref_pv), dim=-1)
    classes = []
    for c in CLASSES:
        t = proc(text=[tpl.format(c) for tpl in TEMPLATES], return_tensors="pt", padding=True)
        classes.append(F.normalize(F.normalize(model.get_text_features(**t), dim=-1).mean(0), dim=0))
    ref = 100.0 * img @ torch.stack(classes).T
    got = vlm.zero_shot_logits(x, CLASSES, TEMPLATES)
    assert got.shape == (2, 3) and torch.allclose(got, ref, atol=1e-4)
    assert torch.allclose(vlm.embed(x), img, atol=1e-6)


def test_class_embeddings_are_cached_per_classes_and_templates(hf_folder):
    vlm = CLIPVLM.load(path=hf_folder)
    calls = []
    inner = vlm._encode_text
    vlm._encode_text = lambda texts: calls.append(len(texts)) or inner(texts)
    x = vlm.to_pixels(_images())
    a = vlm.zero_shot_logits(x, CLASSES, TEMPLATES)
    b = vlm.zero_shot_logits(x, CLASSES, TEMPLATES)
    assert torch.equal(a, b) and calls == [9]
    vlm.zero_shot_logits(x, CLASSES, TEMPLATES[:1])
    assert calls == [9, 3]


def test_class_embeddings_in_chunks_equal_one_batch(hf_folder):
    """The text tower sees at most ``chunk`` texts per call (a chunk boundary inside a class's templates too),
    and the class embeddings equal those of one batch of all texts."""
    from evaluators.vlms.base import ClassEmbeddings

    vlm = CLIPVLM.load(path=hf_folder)
    calls = []
    enc = lambda texts: calls.append(len(texts)) or vlm._encode_text(texts)  # noqa: E731
    whole = ClassEmbeddings(chunk=10_000)(enc, CLASSES, TEMPLATES)
    chunked = ClassEmbeddings(chunk=2)(enc, CLASSES, TEMPLATES)
    assert calls == [9, 2, 2, 2, 2, 1]
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="chunk"):
        ClassEmbeddings(chunk=0)


@pytest.fixture
def float64_default():
    """transformers' CLIP text mask is built with torch's default dtype, which must hold float64's min."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


def test_zero_shot_gradient_matches_finite_differences(hf_folder, float64_default):
    vlm = CLIPVLM.load(path=hf_folder, dtype="float64")
    x = vlm.to_pixels(_images()).double()
    labels = torch.tensor([0, 2])

    def loss(z: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(vlm.zero_shot_logits(z, CLASSES, TEMPLATES), labels, reduction="sum")

    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(loss(xr), xr)
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    h = 1e-5
    with torch.no_grad():
        fd = (loss(x + h * v) - loss(x - h * v)) / (2 * h)
    assert abs(float(fd)) > 1e-4
    assert float((g * v).sum()) == pytest.approx(float(fd), rel=1e-2)


@pytest.mark.parametrize("dtype,tol", [("float16", 2e-2), ("bfloat16", 6e-2)])
def test_half_precision_agrees_with_float32(hf_folder, dtype, tol):
    """Stated tolerance: embeddings within 2e-2 (fp16) / 6e-2 (bf16), logits within 100 x that."""
    ref, half = CLIPVLM.load(path=hf_folder), CLIPVLM.load(path=hf_folder, dtype=dtype)
    x = ref.to_pixels(_images())
    assert torch.allclose(half.embed(x), ref.embed(x), atol=tol)
    assert torch.allclose(half.zero_shot_logits(x, CLASSES, TEMPLATES), ref.zero_shot_logits(x, CLASSES, TEMPLATES),
                          atol=100 * tol)


def test_open_clip_checkpoint_matches_open_clip(oc_files):
    import open_clip

    cfg, weights = oc_files
    vlm = CLIPVLM.load(open_clip={"model": str(cfg), "checkpoint": str(weights)})
    assert vlm.resolution == 32
    net, _, preprocess = open_clip.create_model_and_transforms("tiny-ViT-B-32", pretrained=None)
    net.load_state_dict(torch.load(weights, weights_only=True))
    net.eval()
    tok = open_clip.get_tokenizer("tiny-ViT-B-32")
    x = vlm.to_pixels(_images())
    ref_pv = torch.stack([preprocess(im) for im in _images()])
    assert torch.allclose(vlm._pixel_values(x), ref_pv, atol=1e-5)
    with torch.no_grad():
        img = F.normalize(net.encode_image(ref_pv), dim=-1)
        cls = torch.stack([F.normalize(F.normalize(net.encode_text(tok([t.format(c) for t in TEMPLATES])), dim=-1)
                                       .mean(0), dim=0) for c in CLASSES])
    assert torch.allclose(vlm.zero_shot_logits(x, CLASSES, TEMPLATES), 100.0 * img @ cls.T, atol=1e-4)
    # a random model of the same config gives other logits: the weights file was really read
    other = open_clip.create_model("tiny-ViT-B-32", pretrained=None).eval()
    with torch.no_grad():
        assert not torch.allclose(F.normalize(other.encode_image(ref_pv), dim=-1), img, atol=1e-3)


def test_open_clip_errors(oc_files, tmp_path):
    cfg, weights = oc_files
    with pytest.raises(CheckpointError, match="vlm.open_clip.checkpoint=openai: no such file"):
        CLIPVLM.load(open_clip={"model": "ViT-B-32", "checkpoint": "openai"})
    with pytest.raises(ConfigError, match="not an open_clip model name"):
        CLIPVLM.load(open_clip={"model": "ViT-Q-99", "checkpoint": str(weights)})
    with pytest.raises(CheckpointError, match="does not fit model ViT-B-32"):
        CLIPVLM.load(open_clip={"model": "ViT-B-32", "checkpoint": str(weights)})


def test_the_config_check_runs_without_loading(hf_folder, oc_files, tmp_path):
    from evaluators.vlms.clip import check_clip_files

    check_clip_files(hf_folder)
    check_clip_files(None, {"model": str(oc_files[0]), "checkpoint": str(oc_files[1])})
    with pytest.raises(CheckpointError, match="vlm.open_clip.checkpoint=.*no such file"):
        check_clip_files(hf_folder, {"model": "ViT-B-32", "checkpoint": str(tmp_path / "x.bin")})
    with pytest.raises(CheckpointError, match="vlm.path=.*no such folder"):
        check_clip_files(tmp_path / "absent", {"model": "ViT-B-32", "checkpoint": None})


def test_transformers_folder_errors(hf_folder, tmp_path):
    tic = time.perf_counter()
    with pytest.raises(CheckpointError, match="vlm.path=.*no such folder"):
        CLIPVLM.load(path=tmp_path / "absent")
    partial = tmp_path / "partial"
    partial.mkdir()
    for f in hf_folder.iterdir():
        if f.name != "preprocessor_config.json":
            (partial / f.name).write_bytes(f.read_bytes())
    with pytest.raises(CheckpointError, match="lacks the image processor config"):
        CLIPVLM.load(path=partial)
    (partial / "preprocessor_config.json").write_bytes((hf_folder / "preprocessor_config.json").read_bytes())
    (partial / "config.json").write_text(json.dumps({"model_type": "siglip"}))
    with pytest.raises(CheckpointError, match="model_type 'siglip'"):
        CLIPVLM.load(path=partial)
    assert time.perf_counter() - tic < 10
    with pytest.raises(ConfigError, match="only 'pooled'"):
        CLIPVLM.load(path=hf_folder, embed="tokens")
    with pytest.raises(ConfigError, match="vlm.resolution=224"):
        CLIPVLM.load(path=hf_folder, resolution=224)


def test_run_py_zero_shot_with_apgd_and_diffcap(hf_folder, shapes_env, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    proc = run_py(["vlm=clip", f"vlm.path={hf_folder}", "vlm.resolution=32", "dataset=shapes", "attack=apgd",
                   "attack.steps=2", "defense=diffcap", "defense.t_max=0.02", "defense.eval_draws=1", "n_samples=4",
                   "batch_size=4", f"hydra.run.dir={out}"], shapes_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert {r["task"] for r in recs} == {"classification"} and len(recs) == 4
    assert all(r["status"] == "ok" and r["attack"]["invariants_ok"] for r in recs)
    assert SMALL_WORLD
