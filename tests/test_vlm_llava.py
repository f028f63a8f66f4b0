"""LlavaVLM on a tiny random LlavaForConditionalGeneration saved in the llava-hf layout and loaded through the
user's path (``from_pretrained(folder)``): prompts, pixels, normalisation, loss, gradients, precision, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image

from evaluators.config import CONFIG_DIR, compose_config
from evaluators.errors import ConfigError
from evaluators.tasks.prompting import TaskPrompts
from evaluators.vlms.base import CheckpointError, TokenIds, Turn
from evaluators.vlms.llava import LlavaVLM
from evaluators.vlms.pixels import pad_to_square
from tests.tiny_checkpoints import make_tiny_llava

ROOT = Path(__file__).resolve().parents[1]
SMALL_WORLD = ["dataset.prepare.n_train=8", "dataset.prepare.n_test=48"]
CAPTION = "Provide a short caption for this image."
VQA_SUFFIX = "\nAnswer the question using a single word or phrase."


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_tiny_llava(tmp_path_factory.mktemp("llava") / "tiny-llava-hf")


@pytest.fixture(scope="module")
def vlm(folder) -> LlavaVLM:
    return LlavaVLM.from_pretrained(folder, dtype="float32")


@pytest.fixture(scope="module")
def vlm64(folder) -> LlavaVLM:
    return LlavaVLM.from_pretrained(folder, dtype="float64")


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (40, 70, 3), dtype=np.uint8)),   # landscape
            Image.fromarray(rng.integers(0, 256, (90, 50, 3), dtype=np.uint8))]   # portrait


def _prompt_config(task: str) -> TaskPrompts:
    node = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "prompts" / f"{task}.yaml")["prompts"])
    return TaskPrompts(task, node)


def test_prompts_are_the_chat_template_and_the_papers_literals(vlm):
    caption = _prompt_config("captioning").template("llava")
    vqa = _prompt_config("vqa").template("llava")
    assert caption.user == CAPTION and caption.decoding == {"max_new_tokens": 20, "num_beams": 1, "do_sample": False}
    got = vlm.format_prompt([Turn(caption.user)])
    own = vlm.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": CAPTION}]}], add_generation_prompt=True)
    assert got == own == f"USER: <image>\n{CAPTION} ASSISTANT:"
    q = "what colour is the shape ?"
    assert vlm.format_prompt([Turn(vqa.user.format(question=q))]) == f"USER: <image>\n{q}{VQA_SUFFIX} ASSISTANT:"
    with pytest.raises(ValueError, match="exactly one image"):
        vlm.format_prompt([Turn("a", image=False)])


def test_token_ids_equal_the_processors_own(vlm):
    """The <image> expansion and tokenisation equal the processor's output for the same prompt and image."""
    prompt = f"USER: <image>\n{CAPTION} ASSISTANT:"
    ref = vlm.processor(text=prompt, images=_images()[0], return_tensors="pt")["input_ids"][0].tolist()
    assert vlm._encode(prompt) == ref
    assert ref.count(vlm.model.config.image_token_index) == vlm.n_image_tokens == 16  # (56 / 14)^2, CLS dropped


def test_an_attack_tokenises_each_text_once(vlm, monkeypatch):
    """APGD calls the loss with the same prompts and targets at every step: their ids are memoised."""
    calls = []
    tokenizer = vlm.tokenizer

    class Counting:
        def __getattr__(self, name):
            return getattr(tokenizer, name)

        def __call__(self, text, *args, **kwargs):
            calls.append(text)
            return tokenizer(text, *args, **kwargs)

    monkeypatch.setattr(vlm, "tokenizer", Counting())
    x = vlm.to_pixels(_images())
    prompts = ["USER: <image>\nWhat is it? ASSISTANT:", "USER: <image>\nDescribe it. ASSISTANT:"]
    first = vlm.loss(x, prompts, ["a big red square", "a circle"])
    n = len(calls)
    assert n == 4  # two prompts, two prompt + target texts
    for _ in range(2):
        torch.testing.assert_close(vlm.loss(x, prompts, ["a big red square", "a circle"]), first, rtol=0, atol=0)
    assert len(calls) == n


def test_token_ids_memo_is_bounded_and_read_only():
    seen = []
    ids = TokenIds(lambda text: seen.append(text) or [len(text), 7], maxsize=2)
    assert ids("ab") == (2, 7) and ids("abc") == (3, 7) and ids("ab") == (2, 7) and seen == ["ab", "abc"]
    ids("abcd")  # full: the oldest text ("ab") is forgotten
    assert ids("abc") == (3, 7) and seen == ["ab", "abc", "abcd"]
    assert ids("ab") == (2, 7) and seen == ["ab", "abc", "abcd", "ab"]
    with pytest.raises(ValueError, match="maxsize"):
        TokenIds(len, maxsize=0)


def test_pixels_pad_with_the_mean_colour_then_the_processor(vlm):
    img = _images()[0]
    x = vlm.to_pixels([img])
    assert x.shape == (1, 3, 56, 56) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    fill = tuple(int(255 * m) for m in vlm.processor.image_processor.image_mean)
    assert fill == (122, 116, 104)  # LLaVA-1.5's background colour for the CLIP mean
    # 70x40 padded to 70x70: the top and bottom 15 source rows are the fill colour, here ~12 of 56 rows
    top = x[0, :, :9, :].reshape(3, -1)
    assert torch.allclose(top, torch.tensor(fill, dtype=torch.float32)[:, None] / 255, atol=1.5 / 255)
    assert not torch.allclose(x[0, :, 28], torch.tensor(fill, dtype=torch.float32)[:, None] / 255, atol=0.05)
    # exactly the processor on the padded image, with normalisation applied once (in the model wrapper)
    ref = vlm.processor.image_processor(pad_to_square(img, fill), return_tensors="pt")["pixel_values"]
    assert torch.allclose(vlm._pixel_values(x), ref, atol=1e-5)
    ref_x = (ref * vlm.std.cpu() + vlm.mean.cpu())
    assert torch.allclose(x, ref_x, atol=1e-5)


def test_pixels_crop_is_the_processors_centre_crop(folder):
    crop = LlavaVLM.from_pretrained(folder, dtype="float32", preprocess="crop")
    img = _images()[1]
    x = crop.to_pixels([img])
    ref = crop.processor.image_processor(img, return_tensors="pt")["pixel_values"]
    assert x.shape == (1, 3, 56, 56) and torch.allclose(crop._pixel_values(x), ref, atol=1e-5)
    with pytest.raises(ConfigError, match="vlm.preprocess"):
        LlavaVLM.from_pretrained(folder, preprocess="stretch")


def test_loss_is_the_target_tokens_cross_entropy(vlm):
    """Per sample, equal to transformers' own loss with the prompt tokens masked out (labels -100), computed
    from the processor's inputs; a batch gives the per-sample values."""
    images = _images()
    x = vlm.to_pixels(images)
    prompts = [vlm.format_prompt([Turn(CAPTION)]), vlm.format_prompt([Turn("is there a circle ?" + VQA_SUFFIX)])]
    targets = ["a red circle on the left", "yes"]
    got = vlm.loss(x, prompts, targets)
    fill = vlm.fill
    for i in range(2):
        full = vlm.processor(text=f"{prompts[i]} {targets[i]}", images=pad_to_square(images[i], fill),
                             return_tensors="pt")
        n_prompt = len(vlm.processor(text=prompts[i], images=pad_to_square(images[i], fill))["input_ids"][0])
        ids = torch.cat([full["input_ids"], torch.tensor([[vlm.tokenizer.eos_token_id]])], 1)
        labels = ids.clone()
        labels[:, :n_prompt] = -100
        ref = vlm.model(input_ids=ids, pixel_values=full["pixel_values"], labels=labels).loss
        assert n_prompt + len(targets[i].split()) + 1 == ids.shape[1]
        assert float(got[i]) == pytest.approx(float(ref), rel=1e-5)
    assert got.shape == (2,)


def test_loss_gradient_matches_finite_differences(vlm64):
    x = vlm64.to_pixels(_images()).double()
    prompts = [vlm64.format_prompt([Turn(CAPTION)])] * 2
    targets = ["a blue square", "a green triangle on the right"]
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(vlm64.loss(xr, prompts, targets).sum(), xr)
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    h = 1e-4
    with torch.no_grad():
        fd = (vlm64.loss(x + h * v, prompts, targets).sum() - vlm64.loss(x - h * v, prompts, targets).sum()) / (2 * h)
    analytic = (g * v).sum()
    assert abs(float(analytic)) > 1e-6
    assert float(analytic) == pytest.approx(float(fd), rel=1e-2)


def test_gradient_checkpointing_gives_the_same_gradient_and_generation(folder, vlm64):
    ck = LlavaVLM.from_pretrained(folder, dtype="float64", gradient_checkpointing=True)
    x = vlm64.to_pixels(_images()).double()
    prompts = [vlm64.format_prompt([Turn(CAPTION)])] * 2
    grads = []
    for m in (vlm64, ck):
        xr = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(m.loss(xr, prompts, ["a red circle", "yes"]).sum(), xr)
        grads.append(g)
    assert torch.allclose(grads[0], grads[1], rtol=1e-9, atol=1e-12)
    assert ck.generate(x, prompts, max_new_tokens=6) == vlm64.generate(x, prompts, max_new_tokens=6)


def test_generate_is_greedy_batched_like_single(vlm):
    images = _images()
    x = vlm.to_pixels(images)
    prompts = [vlm.format_prompt([Turn(CAPTION)]), vlm.format_prompt([Turn("how many shapes are there ?" + VQA_SUFFIX)])]
    batch = vlm.generate(x, prompts, max_new_tokens=8)
    assert batch == [vlm.generate(x[i : i + 1], prompts[i : i + 1], max_new_tokens=8)[0] for i in range(2)]
    # the same as transformers' generate on the processor's own inputs
    inputs = vlm.processor(text=prompts[1], images=pad_to_square(images[1], vlm.fill), return_tensors="pt")
    out = vlm.model.generate(**inputs, max_new_tokens=8, do_sample=False)
    ref = vlm.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert batch[1] == ref and len(ref.split()) > 0


@pytest.mark.parametrize("dtype,tol", [("float16", 2e-2), ("bfloat16", 6e-2)])
def test_half_precision_agrees_with_float32(folder, vlm, dtype, tol):
    """Stated tolerance: relative loss difference below 2% (fp16) / 6% (bf16) on the tiny model."""
    half = LlavaVLM.from_pretrained(folder, dtype=dtype)
    assert half.model.dtype == getattr(torch, dtype)
    x = vlm.to_pixels(_images())
    prompts = [vlm.format_prompt([Turn(CAPTION)])] * 2
    targets = ["a red circle", "a blue square on the left"]
    ref, got = vlm.loss(x, prompts, targets), half.loss(x, prompts, targets)
    assert got.dtype == torch.float32
    assert torch.allclose(got, ref, rtol=tol)
    assert torch.allclose(half.embed(x), vlm.embed(x), atol=tol)


def test_embed_outputs(folder, vlm):
    x = vlm.to_pixels(_images())
    e = vlm.embed(x)
    pooled = vlm.model.model.vision_tower(vlm._pixel_values(x)).pooler_output
    assert torch.allclose(e, F.normalize(pooled, dim=-1), atol=1e-6)
    tokens = LlavaVLM.from_pretrained(folder, dtype="float32", embed="tokens")
    et = tokens.embed(x)
    feats = vlm.model.get_image_features(pixel_values=vlm._pixel_values(x))
    feats = torch.stack(list(feats)) if not isinstance(feats, torch.Tensor) else feats  # a list in transformers 4.57
    assert et.shape == (2, 32) and torch.allclose(et, F.normalize(feats.mean(1), dim=-1), atol=1e-6)
    assert vlm.capabilities == {"generate", "loss", "embed"} and vlm.tasks == ("captioning", "vqa")


def test_trust_remote_code_is_off_unless_asked(folder, monkeypatch):
    import transformers

    seen = []
    real = transformers.LlavaForConditionalGeneration.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.LlavaForConditionalGeneration, "from_pretrained", spy)
    LlavaVLM.from_pretrained(folder, dtype="float32")
    assert seen == [False]
    cfg = compose_config(["vlm=llava"])
    assert cfg.vlm.trust_remote_code is False and cfg.vlm.model.trust_remote_code is False


def test_a_hub_id_loads_from_the_local_cache_only(folder, tmp_path, monkeypatch):
    """``vlm.path=org/name`` is the snapshot in the Hugging Face cache (its refs/main), with no network."""
    import shutil

    import huggingface_hub.constants

    repo = tmp_path / "hub" / "models--someone--tiny-llava-hf"
    shutil.copytree(folder, repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    vlm = LlavaVLM.from_pretrained("someone/tiny-llava-hf", dtype="float32")
    assert vlm.resolution == 56
    with pytest.raises(CheckpointError, match="not a model in the local Hugging Face cache"):
        LlavaVLM.from_pretrained("someone/other-model")


def test_bad_checkpoints_fail_fast_with_one_line(folder, tmp_path):
    def fails(path, match):
        tic = time.perf_counter()
        with pytest.raises(CheckpointError, match=match) as e:
            LlavaVLM.from_pretrained(path)
        assert time.perf_counter() - tic < 10 and "\n" not in str(e.value) and "vlm.path" in str(e.value)

    fails(tmp_path / "nope", "no such folder")
    fails("someone/not-cached-model", "not a model in the local Hugging Face cache")
    partial = tmp_path / "partial"
    partial.mkdir()
    for f in folder.iterdir():
        if f.name != "model.safetensors":
            (partial / f.name).write_bytes(f.read_bytes())
    fails(partial, "lacks the weights")
    (partial / "model.safetensors.index.json").write_text('{"weight_map": {"a": "model-00001-of-00002.safetensors"}}')
    fails(partial, "model-00001-of-00002.safetensors")
    (partial / "model.safetensors.index.json").unlink()
    (partial / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    (partial / "chat_template.jinja").unlink()
    fails(partial, "chat template")
    (partial / "chat_template.jinja").write_bytes((folder / "chat_template.jinja").read_bytes())
    (partial / "config.json").write_text('{"model_type": "llava_llama"}')  # the original LLaVA repo's layout
    fails(partial, "model_type 'llava_llama'")
    # the chat template kept in tokenizer_config.json only (older llava-hf revisions) still loads and frames
    (partial / "config.json").write_bytes((folder / "config.json").read_bytes())
    template = (partial / "chat_template.jinja").read_text()
    (partial / "chat_template.jinja").unlink()
    tok_cfg = json.loads((partial / "tokenizer_config.json").read_text())
    (partial / "tokenizer_config.json").write_text(json.dumps({**tok_cfg, "chat_template": template}))
    old = LlavaVLM.from_pretrained(partial, dtype="float32")
    assert old.format_prompt([Turn(CAPTION)]) == f"USER: <image>\n{CAPTION} ASSISTANT:"
    with pytest.raises(ConfigError, match="vlm.resolution=336"):
        LlavaVLM.from_pretrained(folder, dtype="float32", resolution=336)


# ------------------------------------------------------------------------------------- through run.py


@pytest.fixture(scope="module")
def shapes_env(tmp_path_factory) -> dict[str, str]:
    from evaluators.datasets.shapes import generate_shapes

    d = tmp_path_factory.mktemp("data")
    generate_shapes(d / "shapes", n_train=8, n_test=48, size=64, seed=0)
    return dict(os.environ, DIFFCAP_DATA=str(d), DIFFCAP_CACHE=str(d / "cache"), HF_HUB_OFFLINE="1",
                WANDB_MODE="disabled", OMP_NUM_THREADS="1")


def run_py(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "run.py", *args, *SMALL_WORLD], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def test_run_py_end_to_end_with_apgd_and_diffcap(folder, shapes_env, tmp_path):
    out = tmp_path / "run"
    proc = run_py(["vlm=llava", f"vlm.path={folder}", "vlm.resolution=56", "vlm.dtype=float32", "dataset=shapes",
                   "attack=apgd", "attack.steps=2", "defense=diffcap", "defense.t_max=0.02", "defense.eval_draws=1",
                   "n_samples=2", "batch_size=2", f"hydra.run.dir={out}"], shapes_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert {r["task"] for r in recs} == {"captioning", "vqa"} and len(recs) == 4
    for r in recs:
        assert r["status"] == "ok" and r["attack"]["invariants_ok"]
        assert set(r["predictions"]) == {"clean", "clean_defended", "adv", "adv_defended"}
        if r["task"] == "captioning":
            assert r["inputs"]["prompt"] == f"USER: <image>\n{CAPTION} ASSISTANT:"
        else:
            assert r["inputs"]["prompt"] == f"USER: <image>\n{r['inputs']['question']}{VQA_SUFFIX} ASSISTANT:"


def test_run_py_missing_folder_is_one_line(shapes_env, tmp_path):
    out = tmp_path / "run"
    empty = tmp_path / "data"  # the check comes before the data set is prepared: nothing appears here
    env = {**shapes_env, "DIFFCAP_DATA": str(empty)}
    tic = time.perf_counter()
    proc = run_py(["vlm=llava", f"vlm.path={tmp_path / 'absent'}", f"hydra.run.dir={out}"], env)
    seconds = time.perf_counter() - tic
    assert not empty.exists()
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr
    assert errors[0].startswith(f"error: vlm.path={tmp_path / 'absent'}: no such folder")
    assert not out.exists()  # nothing written: not even the run folder or its lock
    assert seconds < 60  # the check itself is instantaneous; the rest is interpreter, Hydra and Java start-up
