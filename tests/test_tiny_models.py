"""TinyCLIP / TinyVLM: save-load round trip, differentiable losses, batching, errors, the training path,
and the committed checkpoints' hashes."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from evaluators.vlms.pixels import pad_to_square, resize_square
from evaluators.vlms.tiny import (
    CLASS_TEMPLATES,
    CheckpointNotFoundError,
    TinyCLIP,
    TinyCLIPConfig,
    TinyVLM,
    TinyVLMConfig,
    WordTokenizer,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["circle", "cross", "hexagon", "square", "star", "triangle"]
QUESTIONS = ["What color is the circle?", "How many shapes are there?", "Is there a red star in the picture?"]


def _tokenizer() -> WordTokenizer:
    texts = ["describe the image .", "question : answer :", "a big red circle on the left", "yes no 1 2 3"]
    texts += QUESTIONS + [t.format(c) for c in CLASSES for t in CLASS_TEMPLATES]
    return WordTokenizer.build(texts)


def _small_vlm(seed: int = 0) -> TinyVLM:
    torch.manual_seed(seed)
    tok = _tokenizer()
    ccfg = TinyCLIPConfig(
        vocab_size=len(tok), resolution=32, channels=(8, 16, 32), embed_dim=32,
        text_width=32, text_layers=1, text_heads=2, text_max_len=24,
    )  # fmt: skip
    vlm = TinyVLM(TinyVLMConfig(clip=ccfg, d_model=32, n_layers=1, n_heads=2, vis_grid=2), tok)
    with torch.no_grad():  # random weights, big enough that greedy outputs differ between images
        vlm.head.weight.mul_(5.0)
        vlm.projector[2].weight.mul_(10.0)
        vlm.blocks[0].attn.out.weight.mul_(10.0)
    return vlm.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[TinyVLM, Path, Path]:
    vlm = _small_vlm()
    root = tmp_path_factory.mktemp("ckpt")
    vlm.save_pretrained(root / "vlm")
    vlm.clip.save_pretrained(root / "clip")
    return vlm, root / "vlm", root / "clip"


def _x(n: int = 3, r: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, r, r, generator=torch.Generator().manual_seed(seed))


def test_round_trip_gives_identical_outputs(saved: tuple[TinyVLM, Path, Path]) -> None:
    vlm, vpath, cpath = saved
    assert sorted(p.name for p in vpath.iterdir()) == ["config.json", "model.safetensors", "vocab.json"]
    again = TinyVLM.from_pretrained(vpath, device="cpu", dtype="float32")
    clip = TinyCLIP.from_pretrained(path=str(cpath), dtype=torch.float32)
    x = _x()
    assert torch.equal(again.embed(x), vlm.embed(x))
    assert torch.equal(clip.embed(x), vlm.embed(x))
    assert torch.equal(clip.classify(x, CLASSES), vlm.classify(x, CLASSES))
    assert again.caption(x) == vlm.caption(x)
    assert again.answer(x, QUESTIONS) == vlm.answer(x, QUESTIONS)
    caps = ["a big red circle", "a circle", "red"]
    assert torch.equal(again.caption_loss(x, caps), vlm.caption_loss(x, caps))
    assert not any(p.requires_grad for p in again.parameters())  # loaded frozen, for attacks
    assert again.tasks == ("captioning", "vqa", "classification") and clip.tasks == ("classification",)
    assert again.resolution == clip.resolution == 32


def test_losses_are_differentiable_in_x(saved: tuple[TinyVLM, Path, Path]) -> None:
    vlm = TinyVLM.from_pretrained(saved[1])
    fns = {
        "caption": lambda x: vlm.caption_loss(x, ["a big red circle on the left", "a circle", "red circle"]),
        "answer": lambda x: vlm.answer_loss(x, QUESTIONS, ["red", "2", "no"]),
        "classify": lambda x: torch.nn.functional.cross_entropy(
            vlm.classify(x, CLASSES), torch.tensor([0, 1, 2]), reduction="none"
        ),
    }
    for name, fn in fns.items():
        x = _x().requires_grad_(True)
        loss = fn(x)
        assert loss.shape == (3,) and torch.isfinite(loss).all(), name
        (g,) = torch.autograd.grad(loss.sum(), x)
        assert torch.isfinite(g).all() and (g.abs().flatten(1).sum(1) > 0).all(), name


def test_batch_equals_one_at_a_time(saved: tuple[TinyVLM, Path, Path]) -> None:
    vlm = saved[0]
    x = _x(4, seed=5)
    qs = QUESTIONS + ["What shape is on the left?"]
    caps = vlm.caption(x)
    answers = vlm.answer(x, qs)
    assert all(isinstance(c, str) for c in caps + answers) and len(caps) == len(answers) == 4
    assert len(set(caps)) > 1  # the image matters
    assert caps == [vlm.caption(x[i : i + 1])[0] for i in range(4)]
    assert answers == [vlm.answer(x[i : i + 1], [qs[i]])[0] for i in range(4)]
    targets = ["a big red circle on the left", "red", "a circle", "yes"]
    batch = vlm.answer_loss(x, qs, targets)
    single = torch.cat([vlm.answer_loss(x[i : i + 1], [qs[i]], [targets[i]]) for i in range(4)])
    assert torch.allclose(batch, single, rtol=1e-5, atol=1e-5), (batch, single)
    logits = vlm.classify(x, CLASSES)
    assert logits.shape == (4, len(CLASSES))
    assert len(vlm.caption(x)[0].split()) <= vlm.config.max_caption_tokens
    assert all(len(a.split()) <= vlm.config.max_answer_tokens for a in answers)


def test_embed_is_normalised(saved: tuple[TinyVLM, Path, Path]) -> None:
    e = saved[0].embed(_x())
    assert torch.allclose(e.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_missing_checkpoint_is_a_clear_error(tmp_path: Path, saved: tuple[TinyVLM, Path, Path]) -> None:
    for cls in (TinyCLIP, TinyVLM):
        with pytest.raises(CheckpointNotFoundError, match=r"nowhere.*train_tiny_models\.py"):
            cls.from_pretrained(tmp_path / "nowhere")
    part = tmp_path / "partial"
    shutil.copytree(saved[1], part)
    (part / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        TinyVLM.from_pretrained(part)


def test_tokenizer_round_trip(tmp_path: Path) -> None:
    tok = _tokenizer()
    ids = tok.encode("What color is the Circle?")
    assert tok.decode(ids) == "what color is the circle ?"
    assert tok.encode("zebra") == [tok.unk_id]
    tok.save(tmp_path / "v.json")
    assert WordTokenizer.load(tmp_path / "v.json").vocab == tok.vocab
    assert tok.decode([ids[0], tok.eos_id, ids[1]]) == "what"


def test_resize_square() -> None:
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    t = resize_square(img, 16)
    assert t.shape == (3, 16, 16) and t.dtype == torch.float32
    assert float(t.min()) >= 0 and float(t.max()) <= 1
    assert torch.allclose(t[:, 8, 8], torch.tensor([1.0, 0.0, 0.0]), atol=1e-3)
    sq = pad_to_square(Image.new("L", (40, 20), 200))
    assert sq.size == (40, 40) and sq.mode == "RGB"
    padded = resize_square(Image.new("RGB", (40, 20), (255, 0, 0)), 16, pad=True)
    assert padded.shape == (3, 16, 16)
    assert torch.allclose(padded[:, 0, 0], torch.tensor([1.0, 0.0, 0.0]))  # padded with the mean colour


def _train_module():
    spec = importlib.util.spec_from_file_location(
        "train_tiny_models", REPO / "scripts" / "train_tiny_models.py"
    )
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_training_code_path_runs(tmp_path: Path) -> None:
    mod = _train_module()
    args = ["--data", str(tmp_path / "shapes"), "--out", str(tmp_path / "ck"), "--n-train", "32", "--n-test", "6",
            "--clip-steps", "4", "--clip-batch", "16", "--vlm-steps", "4", "--vlm-batch", "16", "--d-model", "64",
            "--layers", "1"]  # fmt: skip
    if shutil.which("java") is None:
        args.append("--no-eval")  # CIDEr's PTB tokenizer needs Java
    res = mod.main(args)
    vlm = TinyVLM.from_pretrained(tmp_path / "ck" / "tiny_vlm")
    clip = TinyCLIP.from_pretrained(tmp_path / "ck" / "tiny_clip")
    assert torch.equal(vlm.embed(_x(2, 64)), clip.embed(_x(2, 64)))
    readme = (tmp_path / "ck" / "README.md").read_text()
    assert hashlib.sha256((tmp_path / "ck/tiny_vlm/model.safetensors").read_bytes()).hexdigest() in readme
    if "--no-eval" not in args:
        m = res["metrics"]
        assert 0 <= m["zero_shot_top1"] <= 100 and m["cider"] >= 0 and 0 <= m["vqa_accuracy"] <= 100


def test_vqa_accuracy_rule() -> None:
    mod = _train_module()
    gts = ["two"] * 2 + ["2."] + ["3"] * 7
    # 3 matching answers: leave-one-out min(1, matches/3) averages to 0.7 * 1 + 0.3 * 2/3 = 0.9
    assert mod.vqa_accuracy(["2"], [gts]) == pytest.approx(90.0)
    assert mod.vqa_accuracy(["3"], [gts]) == pytest.approx(100.0)
    assert mod.vqa_accuracy(["red"], [gts]) == 0.0


def test_committed_checkpoints_match_readme() -> None:
    ck = REPO / "checkpoints"
    files = {n: ck / n / "model.safetensors" for n in ("tiny_clip", "tiny_vlm")}
    if not all(f.is_file() for f in files.values()):
        pytest.skip("tiny checkpoints not produced yet (scripts/train_tiny_models.py)")
    readme = (ck / "README.md").read_text()
    for name, f in files.items():
        listed = re.search(rf"\| {name} \| [^|]+ \| ([0-9a-f]{{64}}) \|", readme)
        assert listed, f"no sha256 for {name} in checkpoints/README.md"
        assert hashlib.sha256(f.read_bytes()).hexdigest() == listed.group(1), name
        assert f.stat().st_size < 16 * 2**20
    vlm = TinyVLM.from_pretrained(ck / "tiny_vlm")
    x = torch.rand(2, 3, vlm.resolution, vlm.resolution)
    assert vlm.classify(x, CLASSES).shape == (2, 6) and len(vlm.caption(x)) == 2
