"""`memento demo` end to end at the hidden smoke size: every stage runs, the report files exist with
their keys, a re-run resumes instead of retraining, and mismatched settings are refused."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from memento.cli import app
from memento.toy.demo import (
    MODES,
    PROFILES,
    STAGES,
    DemoConfig,
    Profile,
    Ui,
    repeat,
    run_demo,
    seeds,
    well_formed,
)
from memento.toy.demo.repeat import differences


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
    # A run whose MEMENTO model gets under half right says it is a smoke run.
    assert (report["note"] is None) == (report["modes"]["memento"]["accuracy"] >= 0.5)
    assert report["note"] is None or "smoke run" in (out / "report.md").read_text()


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


def test_same_seed_gives_the_same_report_numbers(smoke_run, tmp_path):
    _, report = smoke_run
    again = run_demo(DemoConfig(out=tmp_path / "again", profile="smoke"), Ui())
    assert differences(again, report) == []
    assert repeat.main([str(tmp_path / "again"), str(smoke_run[0] / "report.json")]) == 0
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


def test_repeat_check_reports_differences_but_not_timings(tmp_path):
    a = {"modes": {"memento": {"accuracy": 0.5, "tokens_per_s": 10.0}}, "timings_s": {"base": 1.0}}
    b = {"modes": {"memento": {"accuracy": 0.5, "tokens_per_s": 99.0}}, "timings_s": {"base": 7.0}}
    assert differences(a, b) == []
    c = {"modes": {"memento": {"accuracy": 0.25, "tokens_per_s": 10.0}}}
    assert differences(a, c) == ["/modes/memento/accuracy: 0.5 != 0.25"]
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "c.json").write_text(json.dumps(c))
    assert repeat.main([str(tmp_path / "a.json"), str(tmp_path / "a.json")]) == 0
    assert repeat.main([str(tmp_path / "a.json"), str(tmp_path / "c.json")]) == 1
    assert repeat.main([str(tmp_path / "a.json"), str(tmp_path / "missing.json")]) == 2


def _fake_report(seed: int, memento: float) -> dict:
    modes = {m: {"accuracy": 1.0, "well_formed": 1.0, "peak_kv": 400.0} for m in MODES}
    modes["memento"].update(accuracy=memento, peak_kv=200.0)
    return {
        "seed": seed,
        "modes": modes,
        "peak_kv_reduction": 2.0,
        "total_cpu_seconds": 600,
        "total_seconds": 900,
    }


def test_seed_table_lists_each_run_with_mean_and_spread(tmp_path):
    text = seeds.table([_fake_report(0, 1.0), _fake_report(1, 0.9)])
    rows = text.splitlines()
    assert rows[2].startswith("| 0 | 100.0% | 100.0% |") and rows[3].startswith("| 1 | 100.0% | 90.0% |")
    assert rows[4].startswith("| mean | 100.0% | 95.0% |")
    assert rows[5].startswith("| min – max | 100.0% – 100.0% | 90.0% – 100.0% |")
    run = tmp_path / "run"
    run.mkdir()
    (run / "report.json").write_text(json.dumps(_fake_report(0, 1.0)))
    assert seeds.main([str(run)]) == 0
    assert seeds.main([str(tmp_path / "unfinished")]) == 2


def test_fields_added_later_stay_out_of_the_fingerprint_at_their_default():
    """Run directories written before `Profile.test_fraction` existed still resume."""
    fingerprint = DemoConfig(out="x", profile="default").fingerprint()
    assert "test_fraction" not in fingerprint["profile"]
    assert Profile(**fingerprint["profile"]) == PROFILES["default"]
    quick = DemoConfig(out="x", profile="quick").fingerprint()["profile"]
    assert quick.get("test_fraction", 0.1) == PROFILES["quick"].test_fraction


def test_each_profile_has_enough_distinct_held_out_problems():
    from memento.toy.tasks import TEST, ChainProblem

    for profile in PROFILES.values():
        task = profile.task
        if task.digits > 2:  # 10^6 start states: plenty for any n_test, too many to hash in a test
            continue
        starts = sum(
            task.split_of(ChainProblem(x, b, 1)) == TEST
            for x in range(task.modulus)
            for b in range(1, task.modulus)
        )
        lengths = profile.test_max_steps - profile.test_min_steps + 1
        assert starts * lengths >= profile.n_test, profile.name
