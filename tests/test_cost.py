"""The cost model's arithmetic (evaluators/cost.py), its unit-cost table, the real-size measuring code on tiny
configs, and the one-line errors of the performance scripts."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from evaluators import cost
from evaluators.config import CONFIG_DIR, compose_config


def _record(task: str, runs: int, draws: list[tuple[int, int]], preds_per_cond: int = 2) -> dict:
    infos = [{"denoiser_evals": d, "encoder_evals": e} for d, e in draws]
    return {"task": task, "status": "ok", "id": "x", "batch": 0,
            "predictions": {"clean": "a", "adv": "b", "clean_defended": ["a"] * preds_per_cond,
                            "adv_defended": ["b"] * preds_per_cond},
            "defense": {"clean_defended": infos, "adv_defended": infos},
            "attack": {"runs": runs, "cache": "hit"}}


def test_counts_from_records_per_image_means():
    recs = [_record("vqa", 2, [(10, 3), (20, 5)]), _record("vqa", 4, [(0, 1), (30, 7)]),
            {"task": "vqa", "status": "error", "id": "bad"}]
    c = cost.counts_from_records(recs, steps=9)["vqa"]
    # per image: both conditions, both draws; attacks as if fresh: runs x (steps + 1); predictions 1+1+2+2 + runs+1
    assert c.denoiser_eval == pytest.approx(((10 + 20) * 2 + (0 + 30) * 2) / 2)
    assert c.encoder_eval == pytest.approx(((3 + 5) * 2 + (1 + 7) * 2) / 2)
    assert c.vlm_fwd_bwd == pytest.approx((2 * 10 + 4 * 10) / 2)
    assert c.vlm_predict == pytest.approx(6 + (3 + 5) / 2)


def test_predict_sums_known_terms_and_names_missing_ones():
    units = [cost.Unit("den", "denoiser_eval", "float32", "cpu", 16, 0.05),
             cost.Unit("den", "denoiser_eval", "float32", "cpu", 1, 0.08),
             cost.Unit("vlm", "vlm_fwd_bwd", "float32", "cpu", 16, 0.01),
             cost.Unit("vlm", "vlm_predict", "float32", "cpu", 16, None, missing="no GPU")]
    archs = {"denoiser_eval": ("den", "float32"), "vlm_fwd_bwd": ("vlm", "float32"),
             "vlm_predict": ("vlm", "float32"), "encoder_eval": ("vlm", "float32")}
    c = cost.Counts(denoiser_eval=100, vlm_fwd_bwd=11, vlm_predict=3)
    p = cost.predict(c, 8, archs, units, "cpu", 12)
    assert p.seconds == pytest.approx(100 * 8 * 0.05 + 11 * 8 * 0.01)  # batch 16 is nearer 12 than batch 1
    assert p.terms["denoiser_eval"]["unit_batch"] == 16
    assert p.missing == ["vlm_predict [vlm, float32, cpu]: no GPU"] and not p.complete
    assert cost.predict(c, 8, archs, units, "cpu", 2).terms["denoiser_eval"]["unit"] == 0.08
    unknown = cost.predict(cost.Counts(encoder_eval=float("nan")), 8, archs, units, "cpu", 16)
    assert unknown.missing == ["encoder_eval [vlm, float32, cpu]: count unknown"] and unknown.seconds == 0


def test_unit_table_round_trip_and_replacement(tmp_path):
    path = tmp_path / "units.json"
    cost.write_units(path, [cost.Unit("a", "encoder_eval", "float32", "cpu", 4, 0.5)])
    cost.write_units(path, [cost.Unit("a", "encoder_eval", "float32", "cpu", 4, 0.25),
                            cost.Unit("a", "encoder_eval", "float32", "cpu", 8, 0.2)])
    units = cost.read_units(path)
    assert [(u.batch, u.seconds_per_image) for u in units] == [(4, 0.25), (8, 0.2)]
    with pytest.raises(ValueError, match="unknown unit kind"):
        cost.write_units(path, [cost.Unit("a", "flops", "float32", "cpu", 1, 1.0)])
    path.write_text("{not json")
    with pytest.raises(cost.DataError, match="unit-cost table"):
        cost.read_units(path)


def test_counts_from_config_of_a_paper_job():
    cfg = compose_config(["experiment=paper/captioning", "defense=diffpure"], check=False)
    c = cost.counts_from_config(cfg, "captioning", None)
    # reverse SDE from t* = 0.15: 150 evaluations, x 3 draws x (clean, adv)
    assert c.denoiser_eval == 150 * 3 * 2 and c.encoder_eval == 0
    assert c.vlm_fwd_bwd == (5 + 1) * (100 + 1)  # RobustVLM's ensemble: 5 captions + the fp32 stage
    assert c.vlm_predict == 1 + 3 + 1 + 3 + 6 + 1
    cap = compose_config(["experiment=paper/captioning", "defense=diffcap"], check=False)
    assert math.isnan(cost.counts_from_config(cap, "captioning", None).denoiser_eval)
    c = cost.counts_from_config(cap, "captioning", 0.05)
    assert c.denoiser_eval == 50 * 3 * 2 and c.encoder_eval == (1 + 50) * 3 * 2
    vqa = compose_config(["experiment=paper/vqa"], check=False)
    assert cost.max_apgd_runs(vqa, "vqa") == 5 + 1 + 2
    assert cost.architectures(cfg)["denoiser_eval"] == ("guided_diffusion_256", "float16")
    assert cost.architectures(cfg)["vlm_fwd_bwd"] == ("llava", "float16")


def test_sweep_overrides_expand_the_grid(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("hydra:\n  sweeper:\n    params:\n      defense: none,diffpure,diffcap\n      attack.eps: 2,4\n")
    jobs = cost.sweep_overrides(path)
    assert len(jobs) == 6 and ["defense=diffcap", "attack.eps=2"] in jobs
    assert len(cost.sweep_overrides(CONFIG_DIR / "experiment" / "paper" / "captioning.yaml")) == 24


def test_real_size_builders_run_on_tiny_configs():
    """The random-weight measuring code (run at full size on a GPU) on shrunk configs."""
    import estimate_cost as ec
    from transformers import CLIPConfig, CLIPVisionConfig, LlamaConfig, LlavaConfig

    cpu = torch.device("cpu")
    unet = dict(image_size=32, num_channels=32, num_res_blocks=1, channel_mult=(1, 2), attention_resolutions="16",
                learn_sigma=True, num_head_channels=32)
    assert ec.gd256_calls("bfloat16", cpu, unet)["denoiser_eval"](2)().shape == (2, 3, 32, 32)
    clip = CLIPConfig(text_config=dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2),
                      vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, image_size=32, patch_size=16), projection_dim=16)
    for make in ec.clip_calls("float32", cpu, clip, classes=5).values():
        make(2)()  # runs (the gradient one returns nothing)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=28, patch_size=14, projection_dim=16)
    text = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2)
    llava = LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=63)
    calls = ec.llava_calls("float32", cpu, llava, prompt=4, target=3, new_tokens=2)
    assert calls["encoder_eval"](2)().shape == (2, 32)
    calls["vlm_fwd_bwd"](2)()
    assert calls["vlm_predict"](1)().shape[1] == 4 + 4 + 2  # prompt + (28 / 14)^2 image tokens + new tokens


@pytest.mark.parametrize("script, argv, message", [
    ("estimate_cost", ["--diffcap-t", "2"], "--diffcap-t=2.0 is not accepted"),
    ("estimate_cost", ["--batch", "x"], "invalid int value"),
    ("estimate_cost", ["--sweep", "vlm=tiny_llava"], "--sweep needs experiment="),
    ("benchmark_purifiers", ["--samplers", "ddim,foo"], "is not accepted"),
    ("benchmark_purifiers", ["--tau", "1.5"], "--tau=1.5 is not accepted"),
    ("benchmark_purifiers", ["--scaling", "1,x"], "--scaling='1,x' is not accepted: a comma-separated list of int"),
    ("benchmark_purifiers", ["--scaling", ","], "--scaling=',' is not accepted"),
    ("benchmark_purifiers", ["--samplers", "sde", "--x"], "unknown argument(s) ['--x']"),
    ("bench_attack", ["--batches", "1,x"], "--batches='1,x' is not accepted"),
    ("bench_attack", ["stray"], "unknown argument(s) ['stray']"),
])
def test_scripts_refuse_bad_input_with_one_line(script, argv, message, monkeypatch, capsys):
    import importlib

    from evaluators.errors import cli

    module = importlib.import_module(script)
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *argv])
    with pytest.raises(SystemExit) as exit_:
        cli(module.main)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_check_run_compares_predicted_with_recorded(tmp_path):
    import estimate_cost as ec

    cfg = compose_config(["vlm=tiny_llava", "attack=apgd", "attack.steps=4", "defense=diffpure", "batch_size=2"])
    from omegaconf import OmegaConf

    (tmp_path / "summary.json").write_text(json.dumps({
        "config": OmegaConf.to_container(cfg, resolve=False), "samples": {"vqa": {"evaluated": 2}},
        "timing_seconds": {"vqa": {"load": 9.0, "attack": 3.0, "defense": 4.0, "predict": 1.0}}}))
    (tmp_path / "samples.jsonl").write_text("\n".join(json.dumps(_record("vqa", 1, [(10, 0)], 1)) for _ in range(2)))
    units = [cost.Unit("shapes_denoiser", "denoiser_eval", "float32", "cpu", 2, 0.1),
             cost.Unit("tiny_llava", "vlm_fwd_bwd", "float32", "cpu", 2, 0.2),
             cost.Unit("tiny_llava", "vlm_predict", "float32", "cpu", 2, 0.05)]
    (row,) = ec.check_run(tmp_path, units)["rows"]
    # per image: 20 denoiser evals, 5 fwd+bwd, 4 + 2 predictions; 2 images
    assert row["predicted"] == pytest.approx(2 * (20 * 0.1 + 5 * 0.2 + 6 * 0.05))
    assert row["recorded"] == 8.0 and row["defense_predicted"] == pytest.approx(4.0) and not row["missing"]


def test_counts_are_taken_from_the_matching_finished_run(tmp_path):
    import estimate_cost as ec

    for name, runs in (("diffcap", 3), ("diffpure", 1)):
        run = tmp_path / name
        run.mkdir()
        (run / "summary.json").write_text(json.dumps({"config": {
            "defense": {"name": name}, "vlm": {"name": "tiny_llava"}, "attack": {"steps": 4}}}))
        (run / "samples.jsonl").write_text(json.dumps(_record("vqa", runs, [(10, 0)], 1)) + "\n")
    cfg = compose_config(["vlm=tiny_llava", "attack=apgd", "defense=diffpure"])
    assert ec.recorded_counts(tmp_path, cfg)["vqa"].vlm_fwd_bwd == 1 * (4 + 1)
    with pytest.raises(cost.DataError, match="no finished run of vlm=tiny_clip"):
        ec.recorded_counts(tmp_path, compose_config(["vlm=tiny_clip", "attack=apgd", "defense=diffpure"]))


def test_the_keep_rule_needs_the_median_gain_and_every_repeat_faster():
    assert cost.faster([1.05, 1.04, 1.10])
    assert not cost.faster([1.05, 0.99, 1.10])  # slower once
    assert not cost.faster([1.02, 1.01, 1.02])  # faster every time, but under MIN_GAIN
    assert not cost.faster([])


def test_bench_attack_options_measure_the_option_against_the_default(tmp_path, monkeypatch):
    """One process, tiny OpenFlamingo, 2 images, 1 APGD step: the option's losses and gradient match the default's
    and every repeat is timed for both."""
    import bench_attack

    from evaluators.errors import cli

    out = tmp_path / "attack"
    monkeypatch.setattr(sys, "argv", ["bench_attack.py", "--parts", "options", "--vlms", "tiny_openflamingo,tiny_llava",
                                      "--batches", "1,2", "--repeats", "2", "--out", str(out), "n_samples=2",
                                      "batch_size=2", "attack.steps=1", "attack.eps=4"])
    cli(bench_attack.main)
    res = json.loads((tmp_path / "attack_options.json").read_text())
    rows = res["rows"]
    assert [(r["vlm"], r["option"], r["batch"]) for r in rows] == [
        ("tiny_openflamingo", "vlm.attention=sdpa", 1), ("tiny_openflamingo", "vlm.attention=sdpa", 2)]  # LLaVA: none
    for r in rows:
        assert r["default"] == "einsum" and len(r["speedups"]) == 2 and r["within_tolerance"]
        assert r["loss_change"] < 1e-5 and 0 < r["gradient_change"] < 1e-5  # float rounding: two code paths ran
        assert r["kept"] == (all(q["kept"] for q in rows))
    assert "| tiny_openflamingo | vlm.attention=sdpa (einsum) | 1 |" in (tmp_path / "attack_options.md").read_text()


def test_bench_attack_throughput_writes_its_unit_costs_beside_its_results(tmp_path, monkeypatch):
    """A benchmark sent elsewhere (--out) must not change the project's unit-cost table."""
    import bench_attack

    from evaluators.config import PROJECT_ROOT
    from evaluators.errors import cli

    table = PROJECT_ROOT / "results" / "bench" / cost.UNIT_FILE
    before = table.read_bytes() if table.exists() else None
    monkeypatch.setattr(sys, "argv", ["bench_attack.py", "--parts", "throughput", "--vlms", "tiny_clip", "--batches",
                                      "1,2", "--repeats", "1", "--out", str(tmp_path / "attack"), "n_samples=2",
                                      "batch_size=2", "attack.steps=1"])
    cli(bench_attack.main)
    units = cost.read_units(tmp_path / cost.UNIT_FILE)
    assert {(u.arch, u.kind, u.batch) for u in units} >= {("tiny_clip", "vlm_fwd_bwd", 1), ("tiny_clip", "vlm_fwd_bwd", 2)}
    assert (table.read_bytes() if table.exists() else None) == before
    rows = json.loads((tmp_path / "attack_throughput.json").read_text())["rows"]
    assert [r["batch"] for r in rows] == [1, 2] and rows[0]["throughput_over_smallest_batch"] == 1.0
