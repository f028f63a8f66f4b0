"""Bad input to the scripts (rescore, tables, plots): one line ``error: ...``, exit status 2, nothing written
or replaced; and a rescore of a good run keeps its metrics."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from tests.bad_inputs import ROOT, Ctx, copy_good_run, one_error_line, tree_hash


@pytest.fixture
def ctx(good_run, tmp_path) -> Ctx:
    return copy_good_run(good_run, tmp_path)


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _script(name: str, args: list[str], capsys, monkeypatch) -> tuple[int, str]:
    from evaluators.errors import cli

    module = _load_script(name)
    monkeypatch.setattr(sys, "argv", [name, *args])
    capsys.readouterr()
    try:
        cli(module.main)
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    return code, capsys.readouterr().err


def _empty_samples(c: Ctx) -> list[str]:
    (c.run / "samples.jsonl").write_text("")
    return [str(c.run)]


def _torn_samples(c: Ctx) -> list[str]:
    lines = (c.run / "samples.jsonl").read_text().splitlines(keepends=True)
    (c.run / "samples.jsonl").write_text("".join(lines[:-1]) + lines[-1][:30])
    return [str(c.run)]


def _garbage_samples(c: Ctx) -> list[str]:
    lines = (c.run / "samples.jsonl").read_text().splitlines(keepends=True)
    lines[3] = "42\n"
    (c.run / "samples.jsonl").write_text("".join(lines))
    return [str(c.run)]


def _duplicated_samples(c: Ctx) -> list[str]:
    text = (c.run / "samples.jsonl").read_text()
    (c.run / "samples.jsonl").write_text(text + text.splitlines(keepends=True)[0])
    return [str(c.run)]


def _no_run_config(c: Ctx) -> list[str]:
    (c.run / "run_config.json").unlink()
    return [str(c.run)]


def _rescore_corrupt_manifest(c: Ctx) -> list[str]:
    (c.run / "manifest_vqa.json").write_text("[")
    return [str(c.run)]


def _not_a_run(c: Ctx) -> list[str]:
    return [str(c.tmp / "nothing-here")]


def _plot_missing_root(c: Ctx) -> list[str]:
    return ["--main", str(c.tmp / "missing"), "--out", str(c.tmp / "p")]


def _plot_no_diffcap_runs(c: Ctx) -> list[str]:
    return ["--tau", str(c.run.parent), "--out", str(c.tmp / "p")]


def _plot_damaged_summary(c: Ctx) -> list[str]:
    (c.run / "summary.json").write_text("{")
    return ["--main", str(c.run.parent), "--out", str(c.tmp / "p")]


SCRIPT_CASES = [
    ("rescore_empty_samples", "rescore", _empty_samples, "lacks 8 of its 8 samples"),
    ("rescore_torn_last_line", "rescore", _torn_samples, "lacks 1 of its 8 samples"),
    ("rescore_garbage_line", "rescore", _garbage_samples, "lacks 1 of its 8 samples"),
    ("rescore_duplicate_record", "rescore", _duplicated_samples, "has duplicate records"),
    ("rescore_without_run_config", "rescore", _no_run_config, "no run_config.json in"),
    ("rescore_corrupt_manifest", "rescore", _rescore_corrupt_manifest, "manifest_vqa.json"),
    ("rescore_not_a_run_folder", "rescore", _not_a_run, "no samples.jsonl in"),
    ("figures_missing_root", "figures", _plot_missing_root, "is not a folder"),
    ("figures_without_diffcap_runs", "figures", _plot_no_diffcap_runs, "no DiffCAP runs"),
    ("figures_damaged_summary", "figures", _plot_damaged_summary, "is damaged"),
    ("tables_missing_root", "tables", lambda c: [str(c.tmp / "missing"), "--out", str(c.tmp / "t")], "is not a folder"),
    ("tables_unknown_facet", "tables", lambda c: [str(c.run.parent), "--rows", "colour", "--out", str(c.tmp / "t")],
     "unknown facet(s) ['colour']"),
    ("calibrate_unavailable_vlm", "calibrate_tau", lambda c: ["vlm=llava", "vlm.path=/nonexistent/llava"],
     "vlm.path=/nonexistent/llava: no such folder"),
    ("calibrate_bad_override", "calibrate_tau", lambda c: ["defense=diffcap", "defense.tau=high"], "defense.tau must be a number"),
]


@pytest.mark.parametrize("script,setup,expected", [c[1:] for c in SCRIPT_CASES], ids=[c[0] for c in SCRIPT_CASES])
def test_scripts_refuse_bad_input_in_one_line(ctx, capsys, monkeypatch, script, setup, expected):
    args = setup(ctx)
    before = tree_hash(ctx.run)
    code, err = _script(script, args, capsys, monkeypatch)
    assert code == 2, err
    assert expected in one_error_line(err)
    assert tree_hash(ctx.run) == before


def test_rescore_never_replaces_a_summary_with_a_worse_one(ctx, capsys, monkeypatch):
    """Records that cover the manifests but lose a condition (here: the attacked predictions) are refused."""
    lines = [json.loads(x) for x in (ctx.run / "samples.jsonl").read_text().splitlines()]
    for r in lines:
        r["predictions"].pop("adv", None)
        r["metrics"].pop("adv", None)
    (ctx.run / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    before = tree_hash(ctx.run)
    code, err = _script("rescore", [str(ctx.run)], capsys, monkeypatch)
    assert code == 2 and "covers less than" in one_error_line(err)
    assert tree_hash(ctx.run) == before


def test_rescore_of_a_good_run_keeps_the_metrics(ctx, capsys, monkeypatch):
    want = json.loads((ctx.run / "summary.json").read_text())["metrics"]
    code, err = _script("rescore", [str(ctx.run)], capsys, monkeypatch)
    assert code == 0, err
    assert json.loads((ctx.run / "summary.json").read_text())["metrics"] == want
    assert not list(ctx.run.glob(".*.tmp"))
