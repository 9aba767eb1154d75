"""`memento demo` end to end at the hidden smoke size: every stage runs, the report files exist with
their keys, a re-run resumes instead of retraining, and mismatched settings are refused."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from memento.cli import app
from memento.toy.demo import MODES, PROFILES, STAGES, DemoConfig, Ui, run_demo, well_formed


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    report = run_demo(DemoConfig(out=out, profile="smoke"), Ui())
    return out, report


def test_smoke_run_writes_report_models_and_plots(smoke_run):
    out, report = smoke_run
    for name in ("report.md", "report.json", "kv_curve.png", "bars.png"):
        assert (out / name).is_file(), name
    for model in ("model-memento", "model-control"):
        assert (out / model / "config.json").is_file()
        assert (out / model / "tokenizer.json").is_file() or (out / model / "tokenizer_config.json").is_file()
        assert not list((out / model).glob("checkpoint-*"))
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk == report
    assert set(report["modes"]) == set(MODES)
    for mode in MODES:
        r = report["modes"][mode]
        for key in (
            "accuracy",
            "well_formed",
            "peak_kv",
            "auc_kv",
            "tokens_per_s",
            "compression",
            "examples",
        ):
            assert key in r, (mode, key)
        assert r["n"] == PROFILES["smoke"].n_test
        assert r["examples"] and {"prompt", "output"} <= set(r["examples"][0])
        assert "<|im_start|>assistant" in r["examples"][0]["prompt"]
    for name in STAGES:
        assert (out / "stages" / f"{name}.json").is_file()
    assert "| mode |" in (out / "report.md").read_text()


def test_rerun_resumes_from_finished_stages(smoke_run):
    out, report = smoke_run
    before = (out / "model-memento" / "model.safetensors").stat().st_mtime_ns
    again = run_demo(DemoConfig(out=out, profile="smoke"), Ui())
    assert again == report
    assert (out / "model-memento" / "model.safetensors").stat().st_mtime_ns == before


def test_other_settings_in_same_dir_are_refused(smoke_run):
    out, _ = smoke_run
    with pytest.raises(ValueError, match="other settings"):
        run_demo(DemoConfig(out=out, profile="smoke", seed=1), Ui())


def _without_timings(value):
    """The report minus what depends on the machine's speed (and the output path)."""
    if isinstance(value, dict):
        return {
            k: _without_timings(v)
            for k, v in value.items()
            if k not in ("seconds", "cpu_seconds", "train_seconds", "tokens_per_s", "wall_seconds", "timings_s",
                         "total_seconds", "cpu_timings_s", "total_cpu_seconds", "machine", "plots")
        }  # fmt: skip
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


def test_same_seed_gives_the_same_report_numbers(smoke_run, tmp_path):
    _, report = smoke_run
    again = run_demo(DemoConfig(out=tmp_path / "again", profile="smoke"), Ui())
    assert _without_timings(again) == _without_timings(report)
    steps = {run: report["training"][run]["steps"] for run in ("base", "control", "stage1", "stage2")}
    smoke = PROFILES["smoke"]
    assert steps == {
        "base": smoke.base_steps,
        "control": smoke.stage1_steps + smoke.stage2_steps,
        "stage1": smoke.stage1_steps,
        "stage2": smoke.stage2_steps,
    }


def test_scale_multiplies_steps():
    cfg = DemoConfig(out="x", profile="default", scale=0.5)
    assert cfg.settings.stage1_steps == round(PROFILES["default"].stage1_steps * 0.5)
    assert cfg.fingerprint() != DemoConfig(out="x", profile="default").fingerprint()


def test_cli_lists_demo_and_validates_scale(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["demo", "--help"])
    assert result.exit_code == 0 and "--quick" in result.output and "--scale" in result.output
    assert "--minutes" not in result.output
    result = runner.invoke(app, ["demo", "--out", str(tmp_path / "x"), "--scale", "-1"])
    assert result.exit_code != 0
    assert not (tmp_path / "x").exists()


def test_well_formed_rules():
    memento = "<think>\n<|block_start|>a<|block_end|>\n<|summary_start|>s<|summary_end|>\n\n</think>\n\nx=123<|endoftext|>"
    assert well_formed(memento, "memento", "stop")
    assert not well_formed(memento, "memento", "length")
    assert not well_formed(memento, "control", "stop")  # markers in a control output
    assert not well_formed("<think>\n<|block_start|>a</think>\n\nx=1", "memento", "stop")
    assert well_formed("<think>\nsteps\n</think>\n\nx=123", "control", "stop")
    assert not well_formed("<think>\nsteps\n</think>\n\n", "control", "stop")


def test_training_lengths_lean_on_the_held_out_lengths():
    for profile in PROFILES.values():
        weights = profile.train_weights
        assert len(weights) == profile.max_steps and abs(sum(weights) - 1) < 1e-9
        held_out = sum(weights[n - 1] for n in range(profile.test_min_steps, profile.test_max_steps + 1))
        uniform = (profile.test_max_steps - profile.test_min_steps + 1) / profile.max_steps
        assert abs(held_out - (profile.long_share + (1 - profile.long_share) * uniform)) < 1e-9
