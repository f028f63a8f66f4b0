"""Keeps the tiny-VLM training code alive: a few steps of each model on a small shapes world, saved in the
published layouts and loaded back through the published loading paths with identical weights."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import tiny_vlm_builders as B  # scripts/ is on pytest's pythonpath (pyproject.toml)
import tiny_vlm_data as D
import torch
import train_tiny_vlms as T

from evaluators.datasets.shapes import generate_shapes


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("shapes")
    generate_shapes(root, n_train=12, n_test=2, seed=0)
    train = D.load_split(root, "train")
    texts = T.corpus(train)
    return train, texts, B.train_bpe(texts, 300), tmp_path_factory.mktemp("ckpt")


def _same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _manifest_ok(folder: Path) -> None:
    lines = (folder / "SHA256SUMS").read_text().splitlines()
    names = {line.split(maxsplit=1)[1] for line in lines}
    assert names == {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != "SHA256SUMS"}
    for line in lines:
        digest, name = line.split(maxsplit=1)
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest


def test_labels_cover_the_target_only(world):
    _, _, bpe, _ = world
    tok = B.llava_tokenizer(bpe)
    batch = T.masked_batch(tok, ["USER: hi ASSISTANT:", "USER: a longer prompt ASSISTANT:"], [" red</s>", " two</s>"])
    for row, want in zip(batch["labels"], ["red</s>", "two</s>"], strict=True):
        assert tok.decode(row[row != -100]).strip() == want
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()


def test_llava_trains_saves_and_loads(world):
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    train, _, bpe, out = world
    model, proc = T.train_llava(train, bpe, steps=2, batch=4, lr=1e-3, seed=0)
    T.save_hf(model, proc, out / "tiny_llava")
    _manifest_ok(out / "tiny_llava")
    loaded = LlavaForConditionalGeneration.from_pretrained(out / "tiny_llava")
    _same_state(model.state_dict(), loaded.state_dict())
    proc2 = LlavaProcessor.from_pretrained(out / "tiny_llava")
    prompt = T.llava_prompt(proc2, T.CAPTION_USER)
    assert prompt == f"USER: <image>\n{T.CAPTION_USER} ASSISTANT:"
    inputs = proc2(images=train["images"][:1], text=[prompt], return_tensors="pt")
    assert inputs["pixel_values"].shape[-1] == B.LLAVA_RES
    assert int((inputs["input_ids"] == loaded.config.image_token_index).sum()) == (B.LLAVA_RES // 12) ** 2
    loaded.generate(**inputs, max_new_tokens=2)


def test_openflamingo_trains_saves_and_loads(world):
    train, _, bpe, out = world
    model, _ = T.train_openflamingo(train, bpe, out / "tiny_openflamingo", steps=2, batch=4, lr=1e-3, seed=0)
    T.write_manifest(out / "tiny_openflamingo")
    _manifest_ok(out / "tiny_openflamingo")
    ckpt = torch.load(out / "tiny_openflamingo" / "checkpoint.pt", weights_only=True)
    assert not any(k.startswith("vision_encoder") for k in ckpt)  # the package never saves the vision tower
    assert any(k.startswith("perceiver.") for k in ckpt) and any("gated_cross_attn_layer." in k for k in ckpt)
    loaded, tok = B.load_openflamingo(out / "tiny_openflamingo")
    _same_state(model.state_dict(), loaded.state_dict())
    assert tok.convert_tokens_to_ids("<image>") == loaded.media_token_id


def test_clip_trains_saves_and_loads(world):
    from transformers import CLIPModel, CLIPProcessor

    train, texts, _, out = world
    model, proc = T.train_clip(train, texts, steps=2, batch=6, lr=1e-3, seed=0, workdir=out / "tiny_clip_hf")
    T.save_hf(model, proc, out / "tiny_clip_hf")
    _manifest_ok(out / "tiny_clip_hf")
    loaded = CLIPModel.from_pretrained(out / "tiny_clip_hf")
    _same_state(model.state_dict(), loaded.state_dict())
    proc2 = CLIPProcessor.from_pretrained(out / "tiny_clip_hf")
    assert proc2.tokenizer("a red circle")["input_ids"] == proc.tokenizer("a red circle")["input_ids"]
    assert proc2.tokenizer.decode(proc2.tokenizer("a red circle")["input_ids"], skip_special_tokens=True).strip() == "a red circle"
    assert proc2(images=train["images"][:1], return_tensors="pt")["pixel_values"].shape[-1] == B.CLIP_RES


@pytest.fixture(scope="module")
def random_clip(world, tmp_path_factory):
    """A randomly initialised tiny CLIP saved as the training saves it (a stand-in for the trained one)."""
    train, texts, _, _ = world
    folder = tmp_path_factory.mktemp("clip_init")
    model, proc = B.build_clip(B.clip_tokenizer(texts, 300, folder))
    T.save_hf(model, proc, folder)
    return model.eval(), folder, train


def test_pi_resize_keeps_the_patch_response():
    import tiny_vlm_init as I

    w = torch.randn(5, 3, 8, 8)
    x = torch.randn(7, 3, 8, 8)
    wr = I.pi_resize_kernel(w, 12)  # LLaVA's case: upsampled patches, where the resize is exact
    xr = torch.nn.functional.interpolate(x, size=(12, 12), mode="bilinear", align_corners=False)
    got, want = torch.einsum("ocij,ncij->no", wr, xr), torch.einsum("ocij,ncij->no", w, x)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_open_clip_tower_from_hf_clip_is_the_same_function(random_clip):
    import open_clip
    import tiny_vlm_init as I

    clip, folder, train = random_clip
    cfg = B.of_vision_config()
    cfg["vision_cfg"]["patch_size"] = 8  # the tiny CLIP's own geometry: the renaming alone must be exact
    visual = open_clip.model.CLIP(**cfg).visual.eval()
    visual.load_state_dict(I.hf_to_open_clip_visual(I.clip_vision_state(folder), 4))
    x = B.normalize(D.to_pixels(train["images"][:3], B.CLIP_RES))
    with torch.no_grad():
        torch.testing.assert_close(visual(x), clip.get_image_features(pixel_values=x), atol=1e-5, rtol=1e-4)


def test_llava_and_openflamingo_towers_start_from_the_clip(world, random_clip, tmp_path):
    clip, folder, train = random_clip
    _, _, bpe, _ = world
    llava, _ = T.train_llava(train, bpe, steps=1, batch=2, lr=0.0, seed=0, vision_init=folder, freeze_vision_steps=1)
    x56, x84 = (B.normalize(D.to_pixels(train["images"][:3], r)) for r in (B.CLIP_RES, B.LLAVA_RES))
    with torch.no_grad():
        want = clip.vision_model(x56).pooler_output
        got = llava.vision_tower(x84).pooler_output
    assert torch.nn.functional.cosine_similarity(want, got).min() > 0.99
    of, _ = T.train_openflamingo(train, bpe, tmp_path / "of", steps=1, batch=2, lr=0.0, seed=0, vision_init=folder,
                                 gate_init=0.5)
    gates = [p for n, p in of.named_parameters() if n.endswith(("attn_gate", "ff_gate"))]
    assert gates and all(g.item() == 0.5 for g in gates)
    assert torch.equal(of.vision_encoder.ln_pre.weight, clip.vision_model.pre_layrnorm.weight)


def test_snapshots_load_and_leave_the_training_unchanged(world, tmp_path):
    """A snapshot is the model at that step in the published layout, and taking it changes nothing (the
    package's saver resets requires_grad, which would silently freeze the tower and the LM)."""
    train, _, bpe, _ = world
    torch.manual_seed(0)
    plain, _ = T.train_openflamingo(train, bpe, tmp_path / "plain", steps=3, batch=2, lr=1e-3, seed=0)
    torch.manual_seed(0)
    snap = T.snapshotter(tmp_path, "openflamingo", {1}, tmp_path / "snapped")
    snapped, _ = T.train_openflamingo(train, bpe, tmp_path / "snapped", steps=3, batch=2, lr=1e-3, seed=0, snapshot=snap)
    _same_state(plain.state_dict(), snapped.state_dict())
    _manifest_ok(tmp_path / "snapshots" / "openflamingo_1")
    at_1, _ = B.load_openflamingo(tmp_path / "snapshots" / "openflamingo_1")
    assert not torch.equal(at_1.perceiver.latents, snapped.perceiver.latents)  # an earlier state, not the final one
