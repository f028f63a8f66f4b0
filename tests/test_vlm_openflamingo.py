"""OpenFlamingo adapter on a tiny OpenFlamingo saved in the published layouts and loaded through the path a
user's checkpoint takes. References: open_flamingo's own preprocessing, forward, generate and answer
post-processing, run on the model object the checkpoints were saved from."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from open_flamingo.eval.coco_metric import postprocess_captioning_generation
from open_flamingo.eval.vqa_metric import postprocess_vqa_generation
from open_flamingo.src.factory import create_model_and_transforms

from evaluators.errors import ConfigError, HarnessError
from evaluators.vlms.base import Turn
from evaluators.vlms.openflamingo import OpenFlamingoVLM
from tests.openflamingo_tiny import (  # noqa: F401  (the fixtures tiny and vlm)
    CAPTION,
    VQA,
    TinyFlamingo,
    build,
    images,
    package_inputs,
    tiny_fixture,
    vlm_fixture,
)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@pytest.mark.parametrize("which", ["trained_ckpt", "training_ckpt", "whole_ckpt", "published_ckpt"])
def test_every_checkpoint_layout_loads_the_saved_model(tiny: TinyFlamingo, which: str) -> None:
    kw = tiny.kwargs(getattr(tiny, which))
    if which == "whole_ckpt":
        kw["clip_vision_encoder_pretrained"] = None  # the whole model needs no separate encoder weights
    loaded = OpenFlamingoVLM.from_pretrained(**kw)
    ref = dict(tiny.reference.state_dict())
    got = loaded.model.state_dict()
    assert got.keys() == ref.keys()
    for k, v in ref.items():
        assert torch.equal(got[k], v), k


def test_loss_is_target_only_mean_ce_of_the_package_forward(tiny: TinyFlamingo, vlm: OpenFlamingoVLM) -> None:
    ims, target = images(1), "a red circle"
    full = CAPTION + target + "<|endofchunk|>"
    vision_x, ids, mask = package_inputs(tiny, ims, [full], "right")
    labels = ids.clone()
    labels[:, : len(tiny.tokenizer(CAPTION)["input_ids"])] = -100  # hugging face ignores these
    with torch.no_grad():
        want = tiny.reference(vision_x=vision_x, lang_x=ids, attention_mask=mask, labels=labels).loss
    got = vlm.loss(vlm.to_pixels(ims), [CAPTION], [target])
    assert got.shape == (1,)
    torch.testing.assert_close(got[0], want, rtol=1e-5, atol=1e-6)


def test_loss_per_sample_does_not_depend_on_the_batch(vlm: OpenFlamingoVLM) -> None:
    x = vlm.to_pixels(images(2))
    prompts, targets = [CAPTION, "Output:two squares<|endofchunk|>\n" + VQA], ["a red circle", "red"]
    batch = vlm.loss(x, prompts, targets)
    alone = torch.cat([vlm.loss(x[i:i + 1], prompts[i:i + 1], targets[i:i + 1]) for i in range(2)])
    torch.testing.assert_close(batch, alone, rtol=1e-5, atol=1e-6)
    other = vlm.loss(torch.rand_like(x), prompts, targets)
    assert (other - batch).abs().min() > 1e-4, "the image does not change the loss"


def test_generate_equals_the_package_pipeline(tiny: TinyFlamingo, vlm: OpenFlamingoVLM) -> None:
    ims = images(2)
    prompts = ["Output:a red circle<|endofchunk|>\nOutput:two squares<|endofchunk|>\n" + CAPTION,
               "<image>Question:Is it red? Short answer:"]
    decoding = dict(num_beams=2, max_new_tokens=5, length_penalty=-2.0, min_new_tokens=2)
    vision_x, ids, mask = package_inputs(tiny, ims, prompts, "left")
    assert not mask.all(), "the prompts must differ in length so that padding matters"
    with torch.no_grad():
        out = tiny.reference.generate(vision_x, ids, attention_mask=mask, **decoding)
    want = tiny.tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
    got = vlm.generate(vlm.to_pixels(ims), prompts, **decoding)
    assert got == want and all(isinstance(s, str) and s for s in got)


def test_gradient_reaches_pixels_and_matches_finite_differences(tiny: TinyFlamingo) -> None:
    """Central differences in fp64 along a random direction agree with autograd to 0.1 %."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # transformers' MPT builds its causal mask in the default dtype
    try:
        _check_gradient(tiny)
    finally:
        torch.set_default_dtype(before)


def _check_gradient(tiny: TinyFlamingo) -> None:
    vlm64 = OpenFlamingoVLM.from_pretrained(**tiny.kwargs()).double()
    x = vlm64.to_pixels(images(1)).double().requires_grad_(True)
    prompts, targets = [VQA], ["red"]
    vlm64.loss(x, prompts, targets).sum().backward()
    d = torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=x.dtype)
    h = 1e-3  # |d| ~ 390, so the step is 0.4 in L2; smaller steps meet the LM's fp32 RMSNorm rounding
    with torch.no_grad():
        fd = (vlm64.loss(x + h * d, prompts, targets) - vlm64.loss(x - h * d, prompts, targets)).item() / (2 * h)
    analytic = (x.grad * d).sum().item()
    assert abs(fd) > 1e-3
    assert abs(analytic - fd) <= 1e-3 * abs(fd), (analytic, fd)


def test_package_alone_gives_no_pixel_gradient(tiny: TinyFlamingo) -> None:
    """Why the adapter swaps the class: open_flamingo's own vision path is under no_grad."""
    vision_x, ids, mask = package_inputs(tiny, images(1), [CAPTION + "red<|endofchunk|>"], "right")
    vision_x.requires_grad_(True)
    out = tiny.reference(vision_x=vision_x, lang_x=ids, attention_mask=mask)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(out.logits.sum(), vision_x)


def test_prompts_are_open_flamingos_literal_strings(vlm: OpenFlamingoVLM) -> None:
    demos = [Turn("Output:", "a red circle", image=False), Turn("Output:", "two squares", image=False)]
    assert vlm.format_prompt([*demos, Turn("Output:")]) == (
        "Output:a red circle<|endofchunk|>\nOutput:two squares<|endofchunk|>\n<image>Output:")
    q = "Question:What colour is the square? Short answer:"
    assert vlm.format_prompt([Turn(q)]) == VQA
    assert vlm.format_prompt([Turn(q, "red", image=False), Turn(q)]) == (
        f"{q}red<|endofchunk|>\n<image>{q}")


def test_pixels_are_224_in_unit_range_and_normalised_once(tiny: TinyFlamingo, vlm: OpenFlamingoVLM) -> None:
    ims = images(2)
    x = vlm.to_pixels(ims)
    assert vlm.resolution == 224 and x.shape == (2, 3, 224, 224)
    assert 0 <= x.min() and x.max() <= 1
    mean, std = torch.tensor(OPENAI_MEAN).view(3, 1, 1), torch.tensor(OPENAI_STD).view(3, 1, 1)
    for im, xi in zip(ims, x, strict=True):  # the package's processor = our pixels, normalised
        torch.testing.assert_close((xi - mean) / std, tiny.image_processor(im), rtol=0, atol=1e-5)
    seen = []
    hook = vlm.model.vision_encoder.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    try:
        vlm.loss(x, [CAPTION] * 2, ["a", "b"])
        vlm.embed(x)
    finally:
        hook.remove()
    assert len(seen) == 2
    for s in seen:
        torch.testing.assert_close(s, (x - mean) / std, rtol=0, atol=1e-6)
    with pytest.raises(ValueError):
        vlm.loss(torch.rand(1, 3, 336, 336), [CAPTION], ["a"])


def test_embed_outputs(vlm: OpenFlamingoVLM) -> None:
    x = vlm.to_pixels(images(2))
    e = vlm.embed(x)
    assert e.shape == (2, 16)
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(2))
    pooled = vlm.model.vision_encoder(vlm._normalise(x))[0]
    torch.testing.assert_close(e, pooled / pooled.norm(dim=-1, keepdim=True))
    vlm.embed_output = "tokens"
    try:
        t = vlm.embed(x)
    finally:
        vlm.embed_output = "pooled"
    assert t.shape == (2, 32) and not torch.allclose(t[:, :16], e)


@pytest.mark.parametrize(("dtype", "rtol"), [("bf16", 0.02), ("fp16", 0.005)])
def test_half_precision_agrees_with_fp32(tiny: TinyFlamingo, vlm: OpenFlamingoVLM, dtype: str, rtol: float) -> None:
    """Stated tolerances: losses within 2 % (bf16) and 0.5 % (fp16) of fp32, embeddings at cosine > 0.999
    (measured on these models: 0.7 % / 0.06 %)."""
    half = OpenFlamingoVLM.from_pretrained(**tiny.kwargs(dtype=dtype))
    assert half.model.perceiver.latents.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    x = vlm.to_pixels(images(2))
    args = ([CAPTION, VQA], ["a red circle", "red"])
    torch.testing.assert_close(half.loss(x, *args), vlm.loss(x, *args), rtol=rtol, atol=0)
    assert ((half.embed(x) * vlm.embed(x)).sum(-1) > 0.999).all()


def test_configured_postprocess_matches_open_flamingo() -> None:
    """The openflamingo templates of configs/prompts clean answers exactly as open_flamingo's evaluation."""
    from evaluators.config import compose_config
    from evaluators.tasks.prompting import PromptTemplate

    tasks = compose_config(["dataset=shapes"]).dataset.tasks
    cap = PromptTemplate.from_config(dict(tasks.captioning.prompts.openflamingo), "captioning")
    vqa = PromptTemplate.from_config(dict(tasks.vqa.prompts.openflamingo), "vqa")
    for raw in [" a red circle Output: two", "a dog\nOutput:", " red Question: what", "blue, green Short",
                "yes Answer: no", "left, right, up", "plain", 'a "big" dog Output: "x"']:
        assert cap.postprocess(raw) == postprocess_captioning_generation(raw).replace('"', "").strip()
        assert vqa.postprocess(raw) == postprocess_vqa_generation(raw).strip()


def test_language_model_needs_no_remote_code(tiny: TinyFlamingo, tmp_path: Path) -> None:
    """MPT's published config names remote code; ours loads it with transformers' own class, and a model
    type transformers lacks stops with a line naming vlm.trust_remote_code."""
    raw = json.loads((tiny.lm / "config.json").read_text())
    if raw.get("model_type") == "mpt":
        assert "auto_map" in raw
        with pytest.raises(OSError):  # the package's own factory insists on the (absent) remote code
            create_model_and_transforms(tiny.vision_json.stem, None, str(tiny.lm), str(tiny.lm), use_local_files=True)
    lm = tmp_path / "custom_lm"
    shutil.copytree(tiny.lm, lm)
    raw.update(model_type="my_custom_lm", auto_map={"AutoConfig": "configuration_x.XConfig",
                                                    "AutoModelForCausalLM": "modeling_x.XForCausalLM"})
    (lm / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=r"vlm\.trust_remote_code=true"):
        OpenFlamingoVLM.from_pretrained(**tiny.kwargs(lang_encoder_path=str(lm)))


def _drop_keys(tiny: TinyFlamingo, tmp: Path, *prefixes: str) -> str:
    """checkpoint.pt without the first key under each prefix (a tied weight is saved under both names)."""
    state = torch.load(tiny.trained_ckpt, weights_only=True)
    for prefix in prefixes:
        del state[next(k for k in state if k.startswith(prefix))]
    torch.save(state, tmp / "checkpoint.pt")
    return str(tmp / "checkpoint.pt")


def _broken(tiny: TinyFlamingo, tmp: Path, case: str) -> tuple[dict, str]:
    kw = tiny.kwargs()
    if case == "no_checkpoint":
        kw["checkpoint"] = str(tmp / "nope" / "checkpoint.pt")
        return kw, "vlm.checkpoint"
    if case == "truncated":
        (tmp / "checkpoint.pt").write_bytes(tiny.trained_ckpt.read_bytes()[:500])
        kw["checkpoint"] = str(tmp / "checkpoint.pt")
        return kw, "vlm.checkpoint"
    if case == "foreign":
        torch.save({"weight": torch.zeros(2)}, tmp / "checkpoint.pt")
        kw["checkpoint"] = str(tmp / "checkpoint.pt")
        return kw, "vlm.checkpoint"
    if case == "lacks_perceiver_weight":
        kw["checkpoint"] = _drop_keys(tiny, tmp, "perceiver.layers")
        return kw, "vlm.checkpoint is incomplete"
    if case == "lacks_embeddings":
        emb = "lang_encoder.model.embed_tokens" if "lm_llama" in str(tiny.lm) else "lang_encoder.transformer.wte"
        kw["checkpoint"] = _drop_keys(tiny, tmp, emb, "lang_encoder.lm_head")
        return kw, "vlm.checkpoint is incomplete"
    if case == "no_vision_weights":
        kw["clip_vision_encoder_pretrained"] = None
        return kw, "vlm.clip_vision_encoder_pretrained"
    if case == "wrong_cross_attn":
        kw["cross_attn_every_n_layers"] = 2
        return kw, "vlm.cross_attn_every_n_layers"
    lm = tmp / "lm"
    shutil.copytree(tiny.lm, lm)
    kw["lang_encoder_path"] = kw["tokenizer_path"] = str(lm)
    if case == "lm_without_weights":
        (lm / "model.safetensors").unlink()
        return kw, "vlm.lang_encoder_path"
    if case == "lm_missing_shard":
        (lm / "model.safetensors").rename(lm / "model-00001-of-00002.safetensors")
        (lm / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
            "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
        return kw, "vlm.lang_encoder_path"
    if case == "no_tokenizer":
        (lm / "tokenizer.json").unlink()
        kw["lang_encoder_path"] = str(tiny.lm)
        return kw, "vlm.tokenizer_path"
    if case == "no_lm_folder":
        kw["lang_encoder_path"] = str(tmp / "missing")
        return kw, "vlm.lang_encoder_path"
    if case == "hub_id_not_cached":
        kw["lang_encoder_path"] = "anas-awadalla/mpt-7b"
        return kw, "vlm.lang_encoder_path"
    if case == "no_vision_config":
        kw["clip_vision_encoder_path"] = str(tmp / "missing.json")
        return kw, "vlm.clip_vision_encoder_path"
    if case == "vision_file_missing":
        kw["clip_vision_encoder_pretrained"] = str(tmp / "vit.pt")
        return kw, "vlm.clip_vision_encoder_pretrained"
    if case == "vision_tag_unknown":
        kw["clip_vision_encoder_pretrained"] = "openai"  # a tag, but the tiny encoder has none
        return kw, "vlm.clip_vision_encoder_pretrained"
    if case == "vision_tag_not_cached":
        kw["clip_vision_encoder_path"], kw["clip_vision_encoder_pretrained"] = "ViT-L-14", "openai"
        return kw, "vlm.clip_vision_encoder_pretrained"
    if case == "resolution":
        kw["resolution"] = 336
        return kw, "vlm.resolution"
    if case == "embed":
        kw["embed"] = "cls"
        return kw, "vlm.embed"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["no_checkpoint", "truncated", "foreign", "lacks_perceiver_weight",
                                  "lacks_embeddings", "no_vision_weights", "wrong_cross_attn", "lm_without_weights",
                                  "lm_missing_shard", "no_tokenizer", "no_lm_folder", "hub_id_not_cached",
                                  "no_vision_config", "vision_file_missing", "vision_tag_unknown",
                                  "vision_tag_not_cached", "resolution", "embed"])
def test_bad_files_fail_fast_with_one_line(tiny: TinyFlamingo, tmp_path: Path, case: str,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_hf_cache"))
    kw, names = _broken(tiny, tmp_path, case)
    start = time.perf_counter()
    with pytest.raises(HarnessError) as info:
        OpenFlamingoVLM.from_pretrained(**kw)
    assert time.perf_counter() - start < 10
    msg = str(info.value)
    assert names in msg and "\n" not in msg, msg


NEEDS_TASKS = not (Path(__file__).resolve().parents[1] / "configs" / "prompts").is_dir()


@pytest.mark.skipif(NEEDS_TASKS, reason="needs the contract's task code and configs/prompts (vlm helper's branch)")
def test_run_py_end_to_end_on_the_tiny_checkpoint(tmp_path: Path) -> None:
    """``python run.py vlm=openflamingo`` with the tiny checkpoint: captioning and VQA under APGD + DiffCAP."""
    import os
    import subprocess
    import sys

    from evaluators.datasets.shapes import generate_shapes

    tiny = build(tmp_path / "model", "mpt")
    generate_shapes(tmp_path / "data" / "shapes", n_train=8, n_test=48, size=64, seed=0)
    env = dict(os.environ, DIFFCAP_DATA=str(tmp_path / "data"), DIFFCAP_CACHE=str(tmp_path / "cache"),
               HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    kw = tiny.kwargs()
    keys = ["clip_vision_encoder_path", "clip_vision_encoder_pretrained", "lang_encoder_path", "tokenizer_path",
            "cross_attn_every_n_layers", "checkpoint"]
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "run.py", "vlm=openflamingo", *[f"vlm.{k}={kw[k]}" for k in keys],
                           "vlm.dtype=fp32", "dataset=shapes", "attack=apgd", "defense=diffcap", "n_samples=4",
                           "batch_size=2", "attack.steps=3", "defense.eval_draws=1", "dataset.prepare.n_train=8",
                           "dataset.prepare.n_test=48", f"hydra.run.dir={out}"],
                          cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert {r["task"] for r in recs} == {"captioning", "vqa"}
    for r in recs:
        prompt = r["inputs"]["prompt"]
        assert prompt.count("<|endofchunk|>") == 2 and prompt.count("<image>") == 1
        assert prompt.endswith("<image>Output:" if r["task"] == "captioning" else " Short answer:")


def test_every_file_the_model_reads_is_fingerprinted() -> None:
    """Results depend on the language model, tokenizer and vision weights too, not only on checkpoint.pt."""
    from evaluators.config import compose_config
    from evaluators.fingerprints import checkpoint_paths

    cfg = compose_config(["vlm=openflamingo", "vlm.checkpoint=/m/checkpoint.pt", "vlm.lang_encoder_path=/m/lm",
                          "vlm.clip_vision_encoder_pretrained=/m/vit.pt"])
    paths = checkpoint_paths(cfg)
    for key, want in [("checkpoint", "/m/checkpoint.pt"), ("lang_encoder_path", "/m/lm"),
                      ("tokenizer_path", "/m/lm"), ("clip_vision_encoder_pretrained", "/m/vit.pt")]:
        assert paths[f"vlm.model.{key}"] == want


def test_openflamingo_9b_size_on_the_meta_device() -> None:
    """The README's parameter count: ViT-L/14 + MPT-7B + open_flamingo's perceiver and cross-attention."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("of_size", Path(__file__).resolve().parents[1] / "scripts" /
                                                  "openflamingo_size.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model = mod.build_meta()
    assert mod.count(model) == 8_131_465_232
    assert mod.count(model.vision_encoder) == 303_966_208
    assert mod.count(model.lang_encoder.gated_cross_attn_layers) == 1_115_815_952
    assert len([b for b in model.lang_encoder.gated_cross_attn_layers if b is not None]) == 8


def test_committed_tiny_openflamingo_loads_through_the_same_class() -> None:
    """configs/vlm/tiny_openflamingo.yaml only points the OpenFlamingo config at the shapes-world files."""
    from hydra.utils import instantiate

    from evaluators.config import compose_config

    tiny_cfg, real_cfg = compose_config(["vlm=tiny_openflamingo"]), compose_config(["vlm=openflamingo"])
    assert tiny_cfg.vlm.model._target_ == real_cfg.vlm.model._target_
    vlm = instantiate(tiny_cfg.vlm.model)
    assert isinstance(vlm, OpenFlamingoVLM) and vlm.resolution == 56
    x = vlm.to_pixels(images(1))
    caption = vlm.generate(x, [vlm.format_prompt([Turn("Output:")])], num_beams=3, max_new_tokens=12,
                           length_penalty=-2.0)[0]
    assert len(caption.split()) >= 2, caption
