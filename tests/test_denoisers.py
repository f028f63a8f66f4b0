"""The Denoiser wrapper, the committed shapes-world checkpoint and the training script."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffcap.denoisers import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    Denoiser,
    build_denoiser,
    load_shapes_denoiser,
    save_denoiser,
)
from diffcap.schedule import LINEAR, Schedule
from diffcap.unet import UNetModel

ROOT = Path(__file__).resolve().parents[1]
CKPT = ROOT / "checkpoints" / "shapes_denoiser"
TINY = dict(image_size=32, num_channels=32, num_res_blocks=1, channel_mult=(1, 2), attention_resolutions="16")


def _randomize(module: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_time_mapping_follows_diffpure_floor():
    den = Denoiser(UNetModel(**TINY))
    t = torch.tensor([0.0, 0.0004, 0.15, 0.2999, 1.0])
    assert den.discrete_timesteps(t).tolist() == [0, 0, 150, 299, 999]
    grid = torch.arange(1001, dtype=torch.float64) / 1000  # every grid time k / N in float32 maps to k
    assert torch.equal(den.discrete_timesteps(grid.float()), torch.arange(1001).clamp(max=999))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        den.discrete_timesteps(torch.tensor([1.5]))
    lin = Denoiser(UNetModel(**TINY), time_scaling="linear999")
    assert torch.allclose(lin.discrete_timesteps(torch.tensor([0.5])), torch.tensor([499.5]))


def test_forward_shapes_scalar_time_and_sigma_channels():
    unet = UNetModel(**TINY, learn_sigma=True)
    _randomize(unet)
    den = Denoiser(unet).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        eps = den(x, 0.2)
        full = unet(x, torch.tensor([200, 200]))
    assert eps.shape == (2, 3, 32, 32)
    torch.testing.assert_close(eps, full[:, :3])
    with pytest.raises(ValueError, match="expected images"):
        den(torch.zeros(1, 3, 16, 16), 0.1)


def test_predict_hands_the_index_through_and_splits_the_variance():
    """``predict`` gives the network the discrete index itself; the variance channels come back separately."""
    unet = UNetModel(**TINY, learn_sigma=True)
    _randomize(unet)
    den = Denoiser(unet).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        eps, var = den.predict(x, torch.tensor([149, 7]))
        full = unet(x, torch.tensor([149, 7]))
    torch.testing.assert_close(eps, full[:, :3], rtol=0, atol=0)
    torch.testing.assert_close(var, full[:, 3:], rtol=0, atol=0)
    plain = Denoiser(UNetModel(**TINY)).eval()
    with torch.no_grad():
        e2, v2 = plain.predict(x, torch.tensor([3, 3]))
    assert v2 is None and e2.shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="index must have shape"):
        den.predict(x, torch.tensor([1]))


def test_schedule_follows_the_config():
    assert Denoiser(UNetModel(**TINY)).schedule == LINEAR
    s = Denoiser(UNetModel(**TINY), num_timesteps=250, beta_start=4e-4, beta_end=0.08).schedule
    assert s == Schedule.from_betas(4e-4, 0.08, 250) and s.num_steps == 250


def test_config_round_trip(tmp_path):
    unet = UNetModel(**TINY, use_scale_shift_norm=True, resblock_updown=True, num_head_channels=32)
    _randomize(unet, seed=2)
    den = Denoiser(unet, time_scaling="linear999")
    save_denoiser(den, tmp_path, extra={"note": "test"})
    assert (tmp_path / CONFIG_NAME).is_file() and (tmp_path / WEIGHTS_NAME).is_file()
    back = load_shapes_denoiser(tmp_path)
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert cfg["extra"] == {"note": "test"}
    assert back.config() == den.config()
    assert build_denoiser(json.loads(json.dumps(den.config()))).config() == den.config()
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(back(x, 0.3), den.eval()(x, 0.3))


def test_missing_shapes_checkpoint_message(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_shapes_denoiser.py"):
        load_shapes_denoiser(tmp_path / "none")


@pytest.mark.skipif(
    not (CKPT / WEIGHTS_NAME).is_file(), reason="shapes denoiser checkpoint not committed yet"
)
def test_committed_shapes_checkpoint():
    readme = (CKPT / "README.md").read_text()
    match = re.search(r"sha256 of model.safetensors: `([0-9a-f]{64})`", readme)
    assert match, "README must state the sha256 of model.safetensors"
    assert hashlib.sha256((CKPT / WEIGHTS_NAME).read_bytes()).hexdigest() == match.group(1)
    den = load_shapes_denoiser(CKPT)  # strict load inside
    assert den.resolution == 64 and not den.learn_sigma
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        eps = den(x, torch.tensor([0.05, 0.3]))
    assert eps.shape == (2, 3, 64, 64) and torch.isfinite(eps).all()


def _load_script():
    spec = importlib.util.spec_from_file_location(
        "train_shapes_denoiser", ROOT / "scripts" / "train_shapes_denoiser.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _fake_world(root: Path, n_train: int = 4, n_test: int = 2, size: int = 32) -> None:
    """Random images in the shapes world's Karpathy-style layout."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    entries = []
    for i in range(n_train + n_test):
        name = f"shapes_{i:05d}.png"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / "images" / name)
        split = "train" if i < n_train else "test"
        entries.append({"filepath": "images", "filename": name, "imgid": i, "split": split, "sentences": []})
    (root / "dataset_shapes.json").write_text(json.dumps({"dataset": "shapes", "images": entries}))


def test_training_script_runs_a_few_steps(tmp_path):
    script = _load_script()
    _fake_world(tmp_path / "world")
    out, png = tmp_path / "ckpt", tmp_path / "samples.png"
    stats = script.main(
        [
            "--data", str(tmp_path / "world"), "--out", str(out), "--samples-png", str(png),
            "--steps", "3", "--batch-size", "2", "--channels", "32", "--channel-mult", "1,2",
            "--attention", "16", "--warmup", "1", "--n-samples", "2", "--sample-steps", "2",
            "--purify-t", "0.003", "--n-purify", "2", "--log-every", "1",
        ]
    )  # fmt: skip
    assert stats["steps_done"] == 3 and np.isfinite(stats["final_loss_mean_last_200"])
    den = load_shapes_denoiser(out)
    assert den.resolution == 32
    sha = hashlib.sha256((out / WEIGHTS_NAME).read_bytes()).hexdigest()
    assert sha in (out / "README.md").read_text()
    assert Image.open(png).size[0] > 64
    # a second stage continues from the first and keeps its record
    stats2 = script.main(
        ["--data", str(tmp_path / "world"), "--init", str(out), "--out", str(out), "--samples-png", str(png),
         "--steps", "1", "--batch-size", "2", "--n-samples", "1", "--sample-steps", "1", "--purify-t", "0.001",
         "--n-purify", "1"]
    )  # fmt: skip
    assert stats2["steps_done"] == 1
    readme = (out / "README.md").read_text()
    assert "## Stage 1" in readme and "## Stage 2" in readme and "--init" in readme
    assert hashlib.sha256((out / WEIGHTS_NAME).read_bytes()).hexdigest() in readme
    assert load_shapes_denoiser(out).config()["unet"] == den.config()["unet"]
