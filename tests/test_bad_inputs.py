"""Bad inputs and damaged files: each ends with exit status 2 and one line ``error: ...`` naming what to fix, with
no traceback, and leaves every good file of the run folder byte-identical (hashed before and after).

Most cases run in-process (compose_config + run + the harness's one error handler, exactly what run.py does);
a few go through ``python run.py`` and the scripts to check the process-level behaviour.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from evaluators.metrics import cider
from tests.bad_inputs import ROOT, Ctx, copy_good_run, invoke, one_error_line, tree_hash


@pytest.fixture
def ctx(good_run, tmp_path) -> Ctx:
    return copy_good_run(good_run, tmp_path)


# ------------------------------------------------------------------------------------ setups of damaged inputs


def _copy_world(c: Ctx) -> Path:
    dst = c.tmp / "world"
    if not dst.exists():
        shutil.copytree(c.world, dst)
    return dst


def edited_annotations(c: Ctx) -> list[str]:
    world = _copy_world(c)
    path = world / "shapes" / "vqa" / "annotations_test.json"
    data = json.loads(path.read_text())
    data["annotations"][0]["answers"] = [{"answer": "changed", "answer_id": i + 1} for i in range(10)]
    path.write_text(json.dumps(data))
    return [f"paths.data_dir={world}"]


def _copy_checkpoint(c: Ctx, published: bool) -> Path:
    dst = c.tmp / "tiny_llava"
    shutil.copytree(ROOT / "checkpoints" / "tiny_llava", dst)
    if not published:
        (dst / "SHA256SUMS").unlink()
    return dst


def _flip_bytes(path: Path, n: int = 200) -> None:
    data = bytearray(path.read_bytes())
    for i in range(n):
        data[-1 - 7 * i] ^= 0xFF
    path.write_bytes(bytes(data))


def flipped_published_weights(c: Ctx) -> list[str]:
    ckpt = _copy_checkpoint(c, published=True)
    _flip_bytes(ckpt / "model.safetensors")
    return [f"vlm.path={ckpt}"]


def changed_weights_on_resume(c: Ctx) -> list[str]:
    ckpt = _copy_checkpoint(c, published=False)
    _flip_bytes(ckpt / "model.safetensors")
    return [f"vlm.path={ckpt}"]


def bad_sha256sums(c: Ctx) -> list[str]:
    ckpt = _copy_checkpoint(c, published=True)
    (ckpt / "SHA256SUMS").write_text("not-a-hash model.safetensors\n")
    return [f"vlm.path={ckpt}"]


def corrupt_run_config(c: Ctx) -> list[str]:
    (c.run / "run_config.json").write_text('{"tasks": [')
    return []


def run_config_not_a_dict(c: Ctx) -> list[str]:
    (c.run / "run_config.json").write_text("[1, 2, 3]")
    return []


def binary_run_config(c: Ctx) -> list[str]:
    (c.run / "run_config.json").write_bytes(b"\xff\xfe\x00garbage")
    return []


def corrupt_manifest(c: Ctx) -> list[str]:
    (c.run / "manifest_vqa.json").write_text("{ torn")
    return []


def manifest_other_subset(c: Ctx) -> list[str]:
    m = json.loads((c.run / "manifest_vqa.json").read_text())
    m["ids"] = m["ids"][::-1]
    (c.run / "manifest_vqa.json").write_text(json.dumps(m))
    return []


def held_lock(c: Ctx) -> list[str]:
    fd = os.open(c.run / ".lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    c.tmp.joinpath("held_fd").write_text(str(fd))  # closed by the test after the case
    return []


def all_images_missing(c: Ctx) -> list[str]:
    world = _copy_world(c)
    for png in (world / "shapes" / "images").glob("*.png"):
        png.write_bytes(b"")
    c.out, c.builds = c.tmp / "fresh", True
    return [f"paths.data_dir={world}", "tasks=[vqa]"]


def broken_java(c: Ctx) -> list[str]:
    bindir = c.tmp / "bin"
    bindir.mkdir()
    (bindir / "java").write_text("#!/bin/sh\nexit 1\n")
    (bindir / "java").chmod(0o755)
    os.environ["PATH"] = f"{bindir}{os.pathsep}{os.environ['PATH']}"
    cider._JAVA_OK.clear()
    c.out = c.tmp / "fresh"
    return ["tasks=[captioning]"]


def fresh_vqa(c: Ctx) -> list[str]:
    c.out = c.tmp / "fresh"
    return ["tasks=[vqa]"]


def no_java(c: Ctx) -> list[str]:
    os.environ["PATH"] = str(c.tmp / "empty-bin")
    cider._JAVA_OK.clear()
    c.out = c.tmp / "fresh"
    return ["tasks=[captioning]"]


def other_dataset(c: Ctx) -> list[str]:
    c.out, c.other_dataset = c.tmp / "fresh", True
    return ["dataset=coco", "tasks=null", f"paths.data_dir={c.tmp / 'nodata'}"]


def wandb_online_without_key(c: Ctx) -> list[str]:
    os.environ.pop("WANDB_API_KEY", None)
    return ["logger=wandb", "logger.mode=online"]


# --------------------------------------------------------------------------------------------------- the table

A = ["attack=apgd"]
DC = ["defense=diffcap"]
DP = ["defense=diffpure"]

#: (id, overrides on top of the good run's, setup, text the one error line must contain)
CASES: list[tuple[str, list[str], Callable[[Ctx], list[str]] | None, str]] = [
    ("n_samples_not_int", ["n_samples=abc"], None, "n_samples='abc' is not accepted: n_samples must be an integer"),
    ("n_samples_zero", ["n_samples=0"], None, "n_samples must be an integer >= 1"),
    ("n_samples_float", ["n_samples=2.5"], None, "n_samples must be an integer"),
    ("batch_size_negative", ["batch_size=-1"], None, "batch_size must be an integer >= 1"),
    ("tau_not_number", [*DC, "defense.tau=high"], None, "defense.tau must be a number in (0, 1)"),
    ("tau_above_one", [*DC, "defense.tau=1.5"], None, "defense.tau must be a number in (0, 1)"),
    ("eps_not_number", [*A, "attack.eps=abc"], None, "attack.eps must be a number in [1, 64] (in 1/255 units)"),
    ("eps_in_unit_range", [*A, "attack.eps=0.0157"], None, "did you mean attack.eps=4"),
    ("eps_too_large", [*A, "attack.eps=100"], None, "attack.eps must be a number in [1, 64] (in 1/255 units)"),
    ("eps_negative", [*A, "attack.eps=-4"], None, "attack.eps must be a number in [1, 64] (in 1/255 units)"),
    ("noise_seed_not_int", ["seed.noise=abc"], None, "seed.noise must be an integer >= 0"),
    ("subset_seed_negative", ["seed.subset=-1"], None, "seed.subset must be an integer >= 0"),
    ("torch_threads_negative", ["torch_threads=-2"], None, "torch_threads must be an integer >= 1"),
    ("device_unknown", ["device=tpu"], None, "device must be one of cpu, cuda, cuda:N, mps"),
    ("device_unavailable", ["device=cuda:99"], None, "device=cuda:99 is not available"),
    ("resume_not_bool", ["resume=maybe"], None, "resume must be true or false"),
    ("harness_version_zero", ["harness_version=0"], None, "harness_version must be an integer >= 1"),
    ("bpda_without_defense", ["attack=bpda_eot"], None, "choose defense=diffpure or defense=diffcap"),
    ("bpda_with_ensemble", ["attack=bpda_eot", *DP, "attack.schedule=ensemble"], None, "attack.schedule=single"),
    ("schedule_unknown", [*A, "attack.schedule=all"], None, "attack.schedule must be one of single, ensemble"),
    ("steps_zero", [*A, "attack.steps=0"], None, "attack.steps must be an integer >= 1"),
    ("eot_iter_zero", ["attack=bpda_eot", *DP, "attack.eot_iter=0"], None, "attack.eot_iter must be"),
    ("eval_draws_zero", ["attack=bpda_eot", *DP, "attack.eval_draws=0"], None, "attack.eval_draws must be"),
    ("adaptive_not_bool", [*A, "attack.adaptive=yes"], None, "attack.adaptive must be true or false"),
    ("precision_unknown", ["attack=apgd_ensemble", "attack.precision=float8"], None, "attack.precision must be"),
    ("step_weight_above_one", [*A, "attack.method.apgd.step_weight=2"], None, "attack.method.apgd.step_weight must be"),
    ("defense_step_zero", [*DC, "defense.step=0"], None, "defense.step must be an integer >= 1"),
    ("defense_keep_unknown", [*DC, "defense.keep=middle"], None, "defense.keep must be one of before, after"),
    ("defense_encoder_unknown", [*DC, "defense.encoder=dino"], None, "defense.encoder must be one of vlm, clip"),
    ("t_max_zero", [*DC, "defense.t_max=0"], None, "defense.t_max must be a number in (0, 1]"),
    ("t_star_above_one", [*DP, "defense.t_star=2"], None, "defense.t_star must be a number in (0, 1]"),
    ("defense_eval_draws_zero", [*DP, "defense.eval_draws=0"], None, "defense.eval_draws must be"),
    ("sampler_steps_zero", [*DP, "defense/sampler=ddim", "defense.sampler.steps=0"], None,
     "defense.sampler.steps must be"),
    ("sampler_dt_zero", [*DP, "defense.sampler.dt=0"], None, "defense.sampler.dt must be a number in (0, 1)"),
    ("task_unknown", ["tasks=[foo]"], None, "dataset=shapes has no task 'foo'"),
    ("task_vlm_cannot_do", ["vlm=tiny_clip", "tasks=[captioning]"], None, "vlm=tiny_clip cannot do 'captioning'"),
    ("tasks_a_number", ["tasks=3"], None, "tasks must be null or a list of task names"),
    ("tasks_a_mapping", ["tasks={a: 1}"], None, "override tasks={a: 1}: Cannot merge DictConfig with ListConfig"),
    ("override_syntax", ["n_samples=[1"], None, "bad override: no viable alternative at input '[1'"),
    ("vlm_missing_folder", ["vlm=llava", "vlm.path=/nonexistent/llava"], fresh_vqa,
     "vlm.path=/nonexistent/llava: no such folder"),
    ("unknown_key", [*A, "attack.stepz=3"], None, "Could not override 'attack.stepz'"),
    ("unknown_group_option", ["vlm=nonexistent"], None, "Could not find 'vlm/nonexistent'"),
    ("dataset_prepare_n_test_zero", ["dataset.prepare.n_test=0"], None, "dataset.prepare.n_test must be"),
    ("wandb_online_without_key", [], wandb_online_without_key, "needs WANDB_API_KEY"),
    ("resume_other_config", ["seed.subset=1"], None, "different config (differs in seed.subset)"),
    ("resume_false_on_existing", ["resume=false"], None, "already holds this run and resume=false"),
    ("run_config_corrupt", [], corrupt_run_config, "run_config.json (the config of the run in this folder) is damaged"),
    ("run_config_not_object", [], run_config_not_a_dict, "run_config.json is not a run config"),
    ("run_config_binary", [], binary_run_config, "run_config.json (the config of the run in this folder) is damaged"),
    ("manifest_corrupt", [], corrupt_manifest, "manifest_vqa.json (the evaluated subset of vqa) is damaged"),
    ("manifest_other_subset", [], manifest_other_subset, "manifest_vqa.json lists another subset"),
    ("annotation_changed_on_resume", [], edited_annotations, "annotation file vqa.annotations_file"),
    ("weights_changed_on_resume", [], changed_weights_on_resume, "weights vlm.model.path"),
    ("published_checkpoint_damaged", [], flipped_published_weights, "does not match its published sha256"),
    ("published_hashes_damaged", [], bad_sha256sums, "is not a sha256sum line"),
    ("run_folder_busy", [], held_lock, "another process is running in"),
    ("missing_checkpoint", ["vlm.path=/nonexistent/tiny_llava"], None, "vlm.path=/nonexistent/tiny_llava"),
    ("missing_data_folder", [], other_dataset, "dataset_coco.json"),
    ("no_usable_sample", [], all_images_missing, "task vqa: none of its 8 samples could be used"),
    ("java_broken", [], broken_java, "does not run (exit status 1)"),
    ("java_missing", [], no_java, "Java not found"),
]


@pytest.mark.parametrize("overrides,setup,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(ctx, capsys, monkeypatch, overrides, setup, expected):
    monkeypatch.setenv("PATH", os.environ["PATH"])  # setups may edit os.environ; monkeypatch restores it
    monkeypatch.setenv("WANDB_MODE", os.environ.get("WANDB_MODE", "disabled"))
    extra = setup(ctx) if setup else []
    before, world_before = tree_hash(ctx.run), tree_hash(ctx.world)
    try:
        code, err = invoke([*ctx.base(), *overrides, *extra], ctx.out or ctx.run, capsys)
    finally:
        held = ctx.tmp / "held_fd"
        if held.exists():
            os.close(int(held.read_text()))
    assert code == 2, err
    line = one_error_line(err)
    assert expected in line, line
    assert tree_hash(ctx.run) == before, "a good file of the run folder changed"
    assert tree_hash(ctx.world) == world_before
    if ctx.out is not None:  # a refused fresh start leaves no claim on its folder
        assert ctx.builds or not (ctx.out / "run_config.json").exists()
        assert not (ctx.out / "summary.json").exists()


def test_there_are_at_least_40_distinct_cases():
    assert len({c[0] for c in CASES}) == len(CASES) >= 40
