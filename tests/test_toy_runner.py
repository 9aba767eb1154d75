"""The reusable study pieces: `StageRunner` (order, marker files, resume, fingerprint, a failed stage
leaves no marker) and `train_run` (exactly N optimizer steps, the same model for the same seed,
checkpoints only when asked for); `run_demo(only=...)` refuses a stage whose inputs are missing."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from memento.toy import make_toy_checkpoint
from memento.toy.demo import PROFILES, DemoConfig, run_demo
from memento.toy.runner import Stage, StageRunner
from memento.toy.training import train_run
from train_traces import make_traces, write_jsonl


def test_runner_runs_in_order_writes_markers_and_resumes(tmp_path):
    calls = []

    def stage(name, value):
        def fn():
            calls.append(name)
            return {"value": value}

        return Stage(name, fn, threads=name == "b")

    stages = [stage("a", 1), stage("b", 2)]
    results = StageRunner(tmp_path, {"seed": 0}, threads=1).run(stages)
    assert calls == ["a", "b"]
    assert results["a"]["value"] == 1 and results["b"]["threads"] == 1 and "seconds" in results["b"]
    assert json.loads((tmp_path / "stages" / "b.json").read_text()) == results["b"]
    again = StageRunner(tmp_path, {"seed": 0}).run(stages)
    assert calls == ["a", "b"]  # nothing ran twice
    assert again == results


def test_runner_refuses_other_settings_and_keeps_failed_stages_unfinished(tmp_path):
    StageRunner(tmp_path, {"seed": 0}).run([Stage("a", lambda: {})])
    with pytest.raises(ValueError, match="other settings"):
        StageRunner(tmp_path, {"seed": 1}).run([Stage("a", lambda: {})])

    def boom():
        raise RuntimeError("interrupted")

    runner = StageRunner(tmp_path, {"seed": 0})
    with pytest.raises(RuntimeError):
        runner.run([Stage("a", lambda: {}), Stage("b", boom)])
    assert runner.done("a") is not None and runner.done("b") is None
    assert runner.run([Stage("a", lambda: {}), Stage("b", lambda: {"ok": True})])["b"]["ok"]


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_run")
    model = make_toy_checkpoint(root / "init", layers=1, hidden=32, heads=2, kv_heads=1, intermediate=64)
    data = write_jsonl(root / "train.jsonl", make_traces(24))
    return root, model, data


def test_train_run_takes_exactly_the_steps_and_is_deterministic(tiny_setup):
    root, model, data = tiny_setup
    kwargs = dict(model=model, data=data, stage="memento", fmt="memento", steps=7, lr=3e-3, seed=0,
                  batch_size=4, warmup_steps=2)  # fmt: skip
    one = train_run(out=root / "one", **kwargs)
    two = train_run(out=root / "two", **kwargs)
    assert one["steps"] == two["steps"] == 7
    assert one["final_loss"] == two["final_loss"] and one["train_tokens"] == two["train_tokens"]
    w1, w2 = (load_file(str(root / d / "model.safetensors")) for d in ("one", "two"))
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert not list((root / "one").glob("checkpoint-*"))


def test_train_run_keeps_checkpoints_when_asked(tiny_setup):
    root, model, data = tiny_setup
    result = train_run(model=model, data=data, out=root / "ckpt", stage="full", fmt="control", steps=4,
                       lr=3e-3, seed=0, batch_size=4, warmup_steps=1, save_every=2)  # fmt: skip
    assert result["steps"] == 4
    assert sorted(p.name for p in (root / "ckpt").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    with pytest.raises(ValueError, match="steps"):
        train_run(
            model=model, data=data, out=root / "x", stage="full", fmt="control", steps=0, lr=1e-3, seed=0
        )


def test_run_demo_only_refuses_missing_inputs(tmp_path):
    cfg = DemoConfig(out=tmp_path / "d", profile="smoke")
    with pytest.raises(ValueError, match="needs"):
        run_demo(cfg, only=("stage2",))
    with pytest.raises(ValueError, match="unknown demo stage"):
        run_demo(cfg, only=("data", "rl"))
    assert not cfg.out.exists()  # refused before anything was written


def test_run_demo_only_trains_a_memento_model_without_the_control(tmp_path):
    profile = replace(PROFILES["smoke"], stage2_steps=2)
    cfg = DemoConfig(out=tmp_path / "d", profile=profile)
    results = run_demo(cfg, only=("data", "base", "stage1", "stage2"))
    assert list(results) == ["data", "base", "stage1", "stage2"]
    assert results["stage2"]["steps"] == 2
    assert (cfg.paths.model("stage2") / "config.json").is_file()
    assert not cfg.paths.model("control").exists()
