"""`memento train` with the paper's recipe (App. A.2.1) by default: 5 epochs, global batch 512 by
gradient accumulation, 32,768 tokens, a checkpoint every 50 steps, gradient checkpointing on GPU,
and Stage 2 started from the best Stage-1 checkpoint on a validation benchmark (--select-by)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from memento.cli import app
from memento.toy import make_toy_checkpoint
from memento.train import SFTConfig, train
from memento.train.sft import resolve_accumulation
from train_traces import make_traces, write_jsonl

TINY = {"layers": 1, "hidden": 32, "heads": 2, "kv_heads": 1, "intermediate": 64}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_toy_checkpoint(tmp_path_factory.mktemp("tiny") / "model", seed=0, **TINY)


@pytest.fixture(scope="module")
def data_path(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "traces.jsonl", make_traces(16, seed=1))


def test_defaults_are_the_papers_recipe():
    cfg = SFTConfig(model="m", data="d", output_dir="o")
    assert (cfg.epochs, cfg.global_batch_size, cfg.grad_accum, cfg.max_length) == (5.0, 512, None, 32768)
    assert (cfg.overlong, cfg.save_steps, cfg.lr, cfg.warmup_ratio, cfg.weight_decay) == (
        "truncate",
        50,
        8e-5,
        0.05,
        0.0,
    )
    assert (cfg.adam_beta1, cfg.adam_beta2, cfg.max_grad_norm, cfg.lr_scheduler) == (
        0.9,
        0.999,
        1.0,
        "cosine",
    )
    assert cfg.gradient_checkpointing is None  # on with CUDA, off on CPU


def test_accumulation_reaches_the_global_batch():
    cfg = SFTConfig(model="m", data="d", output_dir="o")
    assert resolve_accumulation(cfg, 8) == (64, 512)  # 8 GPUs x batch 1
    cfg.batch_size = 4
    assert resolve_accumulation(cfg, 2) == (64, 512)
    cfg.batch_size = 3  # not a divisor: rounded up, and the run says how many it takes
    assert resolve_accumulation(cfg, 1) == (171, 513)
    assert resolve_accumulation(
        SFTConfig(model="m", data="d", output_dir="o", batch_size=2, grad_accum=4), 2
    ) == (4, 16)
    with pytest.raises(ValueError, match="more than --global-batch-size"):
        resolve_accumulation(
            SFTConfig(model="m", data="d", output_dir="o", batch_size=8, global_batch_size=4), 1
        )
    with pytest.raises(ValueError, match="not both"):
        SFTConfig(model="m", data="d", output_dir="o", global_batch_size=256, grad_accum=4)
    with pytest.raises(ValueError, match="set select_by"):
        SFTConfig(model="m", data="d", output_dir="o", select_n=2)


def test_global_batch_by_accumulation_in_a_real_run(tiny_dir, data_path, tmp_path, capsys):
    cfg = SFTConfig(model=str(tiny_dir), data=str(data_path), output_dir=str(tmp_path / "o"), batch_size=2,
                    global_batch_size=8, max_steps=2, save_steps=100, progress=False, lr=1e-3)  # fmt: skip
    result = train(cfg)
    assert (result.grad_accum, result.global_batch_size, result.global_step) == (4, 8, 2)
    state = json.loads((tmp_path / "o" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["epoch"] == pytest.approx(2 * 8 / 16)  # 8 samples per optimizer step
    err = capsys.readouterr().err
    assert "global batch 8 = 2 per device x 1 process(es) x 4 accumulation steps" in err
    assert "gradient checkpointing off" in err  # CPU


def test_selector_hook_picks_the_best_checkpoint_and_stage2_starts_from_it(tiny_dir, data_path, tmp_path):
    out = tmp_path / "stage1"
    cfg = SFTConfig(model=str(tiny_dir), data=str(data_path), output_dir=str(out), batch_size=4, grad_accum=1,
                    max_steps=3, save_steps=1, progress=False)  # fmt: skip
    scores = {"checkpoint-1": 0.2, "checkpoint-2": 0.9, "checkpoint-3": 0.9}
    seen: list[str] = []

    def selector(ckpt: Path) -> float:
        seen.append(ckpt.name)
        return scores[ckpt.name]

    result = train(cfg, selector=selector)
    assert seen == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert result.selection["best"] == "checkpoint-3"  # ties go to the later step
    assert (out / "best").resolve() == (out / "checkpoint-3").resolve()
    saved = json.loads((out / "selection.json").read_text())
    assert saved["scores"] == scores and saved["best"] == "checkpoint-3"
    stage2 = SFTConfig(model=str(out / "best"), data=str(data_path), output_dir=str(tmp_path / "stage2"),
                       stage="memento", batch_size=4, grad_accum=1, max_steps=1, save_steps=100, progress=False)  # fmt: skip
    assert train(stage2).global_step == 1


@pytest.mark.slow
def test_select_by_a_benchmark_through_the_cli(tiny_dir, data_path, tmp_path):
    bench = tmp_path / "val.jsonl"
    bench.write_text("".join(json.dumps({"id": i, "problem": f"Count from {i} to {i + 3}.", "answer": str(i + 3)}) + "\n"
                             for i in range(2)))  # fmt: skip
    out = tmp_path / "run"
    args = ["train", "--model", str(tiny_dir), "--data", str(data_path), "--output-dir", str(out),
            "--batch-size", "4", "--grad-accum", "1", "--max-steps", "2", "--save-steps", "1", "--no-progress",
            "--select-by", str(bench), "--select-n", "1", "--select-max-new-tokens", "4", "--json"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    selection = json.loads(result.stdout)["selection"]
    assert set(selection["scores"]) == {"checkpoint-1", "checkpoint-2"}
    assert all(0.0 <= s <= 1.0 for s in selection["scores"].values())
    assert "mode full" in selection["by"]  # Stage 1 is scored with full attention
    for name in ("checkpoint-1", "checkpoint-2"):
        lines = (out / "selection" / name / "results.jsonl").read_text().splitlines()
        assert len(lines) == 2  # 2 problems x 1 sample
    assert (out / "best").is_dir()


def test_cli_refuses_contradictions_before_loading(tiny_dir, data_path, tmp_path):
    out = tmp_path / "never"
    base = ["train", "--model", str(tiny_dir), "--data", str(data_path), "--output-dir", str(out)]
    cases = [
        (["--grad-accum", "2", "--global-batch-size", "64"], "not both"),
        (["--select-by", str(tmp_path / "missing.jsonl")], "--select-by"),
        (["--select-n", "2"], "select_by"),
    ]
    for extra, message in cases:
        result = CliRunner().invoke(app, [*base, *extra])
        assert result.exit_code == 2 and message in result.output, (extra, result.output)
        assert not out.exists()


def test_demo_training_keeps_its_own_profile(monkeypatch, tmp_path):
    # The demo's step-budgeted runs pass one batch per optimizer step explicitly: the paper's global
    # batch of 512 would make each of its steps 85x larger.
    import memento.train.sft as sft
    from memento.toy.training import train_run

    captured = {}

    def fake_train(cfg, callbacks=None, selector=None):
        captured["cfg"] = cfg
        return SimpleNamespace(global_step=3, train_tokens=1, final_loss=0.5, seconds=1.0, tokens_per_s=1.0)

    monkeypatch.setattr(sft, "train", fake_train)
    train_run(model="m", data="d", out=tmp_path / "o", stage="full", fmt="memento", steps=3, lr=1e-3, seed=0)
    cfg = captured["cfg"]
    assert (cfg.grad_accum, cfg.gradient_checkpointing, cfg.max_steps, cfg.batch_size) == (1, False, 3, 6)
