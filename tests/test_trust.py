"""Results are tied to what they came from: the adversarial cache keys on the weights' content, resume survives a
moved data folder but not changed data, failed samples are retried, and every image mode and damaged image file is
handled per sample. Plus the process-level behaviour of ``python run.py`` (no run folder for a bad override, a
refused resume leaves ``.hydra/`` as it was, a second process in one folder is refused)."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evaluators.config import compose_config
from evaluators.fingerprints import sha256_file
from evaluators.images import load_images
from evaluators.runner import run

ROOT = Path(__file__).resolve().parents[1]
SMALL_WORLD = ["dataset.prepare.n_train=8", "dataset.prepare.n_test=48"]
ATTACK = ["experiment=fast_dev", "vlm=tiny_clip", "tasks=[classification]", "attack=apgd", "attack.steps=2", "n_samples=4",
          *SMALL_WORLD]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    from evaluators.datasets.shapes import generate_shapes

    d = tmp_path_factory.mktemp("world")
    generate_shapes(d / "shapes", n_train=8, n_test=48, size=64, seed=0)
    return d


def run_in(out: Path, overrides: list[str]) -> dict:
    return run(compose_config(overrides, output_dir=out))


def test_changed_weights_at_the_same_path_miss_the_cache(world, tmp_path):
    ckpt = tmp_path / "tiny_clip_hf"
    shutil.copytree(ROOT / "checkpoints" / "tiny_clip_hf", ckpt)
    (ckpt / "SHA256SUMS").unlink()  # retrained weights publish no hash
    common = [*ATTACK, f"paths.data_dir={world}", f"paths.cache_dir={tmp_path / 'cache'}", f"vlm.path={ckpt}"]
    first = run_in(tmp_path / "a", common)
    again = run_in(tmp_path / "b", common)
    assert first["attack"]["classification"]["cache_misses"] == 4
    assert again["attack"]["classification"]["cache_hits"] == 4  # same weights: reused

    from safetensors.torch import load_file, save_file

    state = load_file(str(ckpt / "model.safetensors"))
    name = next(k for k in state if state[k].dtype.is_floating_point)
    state[name] = state[name] + 1e-3
    save_file(state, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    changed = run_in(tmp_path / "c", common)
    assert changed["attack"]["classification"]["cache_misses"] == 4
    assert changed["attack"]["classification"]["cache_hits"] == 0
    assert changed["fingerprints"]["weights"] != first["fingerprints"]["weights"]


def test_moved_data_folder_resumes_and_changed_annotations_do_not(world, tmp_path, capsys):
    from evaluators.errors import IntegrityError

    old = tmp_path / "old"
    shutil.copytree(world, old)
    args = ["experiment=fast_dev", "tasks=[vqa]", *SMALL_WORLD, f"paths.cache_dir={tmp_path / 'cache'}"]
    first = run_in(tmp_path / "run", [*args, f"paths.data_dir={old}"])
    assert set(first["fingerprints"]["data"]) == {"vqa.questions_file", "vqa.annotations_file",
                                                  "vqa.demo_questions_file", "vqa.demo_annotations_file"}
    new = tmp_path / "moved"
    old.rename(new)
    again = run_in(tmp_path / "run", [*args, f"paths.data_dir={new}"])
    assert again["metrics"] == first["metrics"]

    path = new / "shapes" / "vqa" / "annotations_test.json"
    data = json.loads(path.read_text())
    data["annotations"][0]["multiple_choice_answer"] = "changed"
    path.write_text(json.dumps(data))
    with pytest.raises(IntegrityError, match="annotation file vqa.annotations_file .*annotations_test.json"):
        run_in(tmp_path / "run", [*args, f"paths.data_dir={new}"])


def test_failed_samples_are_retried_on_resume(world, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(world, data)
    args = ["experiment=fast_dev", "vlm=tiny_clip", "tasks=[classification]", *SMALL_WORLD, f"paths.data_dir={data}",
            f"paths.cache_dir={tmp_path / 'cache'}"]
    probe = run_in(tmp_path / "probe", args)
    manifest = json.loads((tmp_path / "probe" / "manifest_classification.json").read_text())
    assert probe["samples"]["classification"]["errors"] == 0
    victim = next((data / "shapes" / "classes" / "test").rglob(f"{manifest['ids'][0].split('/')[-1]}.png"))
    good = victim.read_bytes()
    victim.write_bytes(good[: len(good) // 2])  # truncated
    broken = run_in(tmp_path / "run", args)
    assert broken["samples"]["classification"]["errors"] == 1
    victim.write_bytes(good)
    fixed = run_in(tmp_path / "run", args)
    assert fixed["samples"]["classification"] == {"evaluated": 8, "errors": 0, "error_ids": []}
    assert fixed["metrics"] == probe["metrics"]


def test_damaged_lines_in_samples_are_recomputed_on_resume(world, tmp_path):
    args = ["experiment=fast_dev", "vlm=tiny_clip", "tasks=[classification]", *SMALL_WORLD, f"paths.data_dir={world}",
            f"paths.cache_dir={tmp_path / 'cache'}"]
    want = run_in(tmp_path / "run", args)
    samples = tmp_path / "run" / "samples.jsonl"
    lines = samples.read_text().splitlines(keepends=True)
    lines[1] = "42\n"
    lines[2] = '{"task": "classification"}\n'
    samples.write_text("".join(lines))
    got = run_in(tmp_path / "run", args)
    assert got["metrics"] == want["metrics"]
    assert len(samples.read_text().splitlines()) == 8


# ------------------------------------------------------------------------------------------------------ images


def _save(tmp: Path, name: str, array: np.ndarray, mode: str | None = None) -> Path:
    path = tmp / name
    (Image.fromarray(array, mode) if mode else Image.fromarray(array)).save(path)
    return path


def test_image_modes_are_converted_to_the_right_8_bit_rgb(tmp_path):
    ramp16 = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    want = np.rint(ramp16 / 257.0).astype(np.uint8)
    cases = {
        "gray16.png": (_save(tmp_path, "gray16.png", ramp16), want),
        "gray8.png": (_save(tmp_path, "gray8.png", want), want),
        "float.tif": (_save(tmp_path, "float.tif", (ramp16 / 65535.0).astype(np.float32), "F"), want),
    }
    palette = Image.fromarray(want).convert("P")
    palette.save(tmp_path / "palette.png")
    cases["palette.png"] = (tmp_path / "palette.png", np.asarray(palette.convert("L")))
    la = Image.fromarray(np.stack([want, np.full_like(want, 128)], -1), "LA")
    la.save(tmp_path / "la.png")
    cases["la.png"] = (tmp_path / "la.png", want)
    images, errors = load_images([str(p) for p, _ in cases.values()])
    assert errors == [None] * len(cases)
    for (name, (_, expected)), im in zip(cases.items(), images, strict=True):
        got = np.asarray(im)
        assert im.mode == "RGB" and got.shape == (32, 32, 3), name
        assert np.abs(got[..., 0].astype(int) - expected.astype(int)).max() <= 1, name


def test_damaged_images_are_per_sample_errors(tmp_path, monkeypatch):
    good = _save(tmp_path, "good.png", np.zeros((8, 8, 3), np.uint8))
    data = good.read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not a png at all")
    (tmp_path / "folder.png").mkdir()
    bomb = _save(tmp_path, "bomb.png", np.zeros((64, 64), np.uint8))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 pixels > 2x the limit: DecompressionBombError
    warn = _save(tmp_path, "warn.png", np.zeros((40, 40), np.uint8))  # 1600 > 1000: a warning, made an error
    paths = ["truncated.png", "empty.png", "text.png", "folder.png", "missing.png", bomb.name, warn.name]
    images, errors = load_images([str(tmp_path / p) for p in paths])
    assert images == [None] * len(paths)
    for p, e in zip(paths, errors, strict=True):
        assert e is not None and p in e
    assert "decompression bomb" in errors[5].lower() or "exceeds limit" in errors[5]


def test_fingerprints_are_cached_by_path_size_and_mtime(tmp_path, caplog):
    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 1000)
    cache = tmp_path / "cache"
    want = hashlib.sha256(b"a" * 1000).hexdigest()
    assert sha256_file(f, cache) == want
    entry = next((cache / "fingerprints").iterdir())
    stamp = json.loads(entry.read_text())
    entry.write_text(json.dumps({**stamp, "sha256": "0" * 64}))  # a forged entry with the right stamp is trusted
    assert sha256_file(f, cache) == "0" * 64
    f.write_bytes(b"b" * 1000)  # same size, new mtime: hashed again
    os.utime(f, ns=(stamp["mtime_ns"] + 10**9, stamp["mtime_ns"] + 10**9))
    assert sha256_file(f, cache) == hashlib.sha256(b"b" * 1000).hexdigest()
    entry.write_text("{damaged")
    assert sha256_file(f, cache) == hashlib.sha256(b"b" * 1000).hexdigest()
    assert str(entry) in caplog.text


# ------------------------------------------------------------------------------------------ python run.py


def _run_py(args: list[str], world: Path, cache: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, DIFFCAP_DATA=str(world), DIFFCAP_CACHE=str(cache), HF_HUB_OFFLINE="1",
               WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "run.py", *args, *SMALL_WORLD], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def _one_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    return lines[0]


def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_run_py_refusals_are_one_line_and_touch_nothing(world, tmp_path):
    out = tmp_path / "run"
    bad = _run_py(["experiment=fast_dev", "n_samples=abc", f"hydra.run.dir={out}"], world, tmp_path / "cache")
    assert "n_samples" in _one_line(bad)
    assert not out.exists()  # refused before Hydra made the folder

    args = ["experiment=fast_dev", "vlm=tiny_clip", "tasks=[classification]", f"hydra.run.dir={out}"]
    assert _run_py(args, world, tmp_path / "cache").returncode == 0
    assert (out / ".hydra" / "config.yaml").exists()
    before = _tree(out)
    refused = _run_py([*args, "seed.subset=1"], world, tmp_path / "cache")
    assert "differs in seed.subset" in _one_line(refused)
    assert _tree(out) == before  # .hydra/ and the log included

    fd = os.open(out / ".lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        busy = _run_py(args, world, tmp_path / "cache")
    finally:
        os.close(fd)
    assert "another process is running in" in _one_line(busy)
    assert _tree(out) == before


def test_published_hashes_of_the_committed_checkpoints_match():
    from evaluators.fingerprints import NOT_WEIGHTS, checkpoint_fingerprint, published_hashes

    for name in ("tiny_llava", "tiny_clip_hf", "tiny_openflamingo", "shapes_denoiser"):
        folder = ROOT / "checkpoints" / name
        published = published_hashes(folder)
        listed = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name not in NOT_WEIGHTS}
        assert set(published) == listed  # every file is published
        assert {"model.safetensors", "checkpoint.pt"} & set(published)
        fingerprinted = checkpoint_fingerprint(folder)
        for sub in {p.split("/")[0] for p in published if "/" in p}:  # OpenFlamingo's lm/ is checked via the parent list
            fingerprinted |= {f"{sub}/{k}": v for k, v in checkpoint_fingerprint(folder / sub).items()}
        assert fingerprinted == published


def test_a_subfolder_is_checked_against_its_parents_published_hashes(tmp_path):
    from evaluators.errors import IntegrityError
    from evaluators.fingerprints import checkpoint_fingerprint

    ckpt = tmp_path / "tiny_openflamingo"
    shutil.copytree(ROOT / "checkpoints" / "tiny_openflamingo", ckpt)
    checkpoint_fingerprint(ckpt / "lm")
    (ckpt / "lm" / "config.json").write_text((ckpt / "lm" / "config.json").read_text() + " ")
    with pytest.raises(IntegrityError, match="lm/config.json does not match its published sha256"):
        checkpoint_fingerprint(ckpt / "lm")


@pytest.mark.parametrize("exc,expected", [
    (PermissionError(13, "Permission denied", "/runs/x/samples.jsonl"), "cannot write or read /runs/x/samples.jsonl"),
    (OSError(28, "No space left on device", "/runs/x/summary.json"), "No space left on device"),
    (RuntimeError("wrapper"), None),
])
def test_the_handler_reports_user_errors_in_one_line_and_reraises_bugs(exc, expected, capsys):
    """A read-only or full disk is the user's to fix (root ignores permissions, so this is checked directly);
    anything else is a bug and keeps its traceback."""
    from evaluators.errors import report

    if expected is None:
        with pytest.raises(RuntimeError, match="wrapper"):
            report(exc)
        return
    wrapped = RuntimeError("instantiate failed")
    wrapped.__cause__ = exc  # as Hydra's instantiate wraps it
    assert report(wrapped) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and expected in err
