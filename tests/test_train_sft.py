"""End to end: a tiny model learns toy traces under Stage 2, checkpoints resume where they stopped,
the output loads with the Auto classes, and `memento train` works from the command line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from memento.masking import attention_mask
from memento.tokens import MarkerIds
from memento.toy import make_toy_checkpoint
from memento.train import SFTConfig, TrainResult, tokenize_trace, train
from train_traces import make_traces, write_jsonl

STEPS = 200
TINY = {"layers": 2, "hidden": 64, "heads": 2, "kv_heads": 1, "intermediate": 128}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: these tiny models are overhead-bound, and on a busy 2-core machine extra
    threads only contend (20-40x slower steps measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_toy_checkpoint(tmp_path_factory.mktemp("tiny") / "model", seed=0, **TINY)


@pytest.fixture(scope="module")
def data_path(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "traces.jsonl", make_traces(48, seed=1))


def _config(model: Path, data: Path, out: Path, **overrides) -> SFTConfig:
    values = dict(
        model=str(model),
        data=str(data),
        output_dir=str(out),
        stage="memento",
        max_steps=STEPS,
        lr=3e-3,
        batch_size=4,
        grad_accum=1,
        logging_steps=10,
        save_steps=STEPS // 2,
        progress=False,
        seed=0,
    )
    values.update(overrides)
    return SFTConfig(**values)


@pytest.fixture(scope="module")
def stage2_run(tiny_dir, data_path, tmp_path_factory) -> TrainResult:
    return train(_config(tiny_dir, data_path, tmp_path_factory.mktemp("run") / "out"))


def test_stage2_training_lowers_the_loss(stage2_run):
    losses = [h["loss"] for h in stage2_run.log_history if "loss" in h]
    assert stage2_run.global_step == STEPS
    assert losses[-1] < 0.5 * losses[0], losses
    assert stage2_run.final_loss == losses[-1]
    assert stage2_run.train_tokens > 0 and stage2_run.tokens_per_s > 0
    assert stage2_run.attention == "sdpa"


def test_output_dir_loads_and_runs_a_masked_forward(stage2_run, data_path):
    out = Path(stage2_run.output_dir)
    record = json.loads((out / "memento_train.json").read_text())
    assert record["config"]["stage"] == "memento" and record["result"]["global_step"] == STEPS
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, attn_implementation="sdpa").eval()
    assert tokenizer.chat_template
    markers = MarkerIds.from_tokenizer(tokenizer)
    ids = tokenize_trace(make_traces(1, seed=99)[0], tokenizer).input_ids
    mask = attention_mask(ids, markers)
    assert not mask.tril().all()
    with torch.no_grad():
        logits = model(
            input_ids=torch.tensor([ids]),
            attention_mask=mask[None, None],
            position_ids=torch.arange(len(ids))[None],
        ).logits
    assert torch.isfinite(logits).all()
    # Checkpoints carry the tokenizer too.
    ckpt = out / f"checkpoint-{STEPS // 2}"
    assert (ckpt / "tokenizer_config.json").is_file() and (ckpt / "trainer_state.json").is_file()


def test_resume_continues_from_the_checkpoint_step(stage2_run, tiny_dir, data_path, tmp_path):
    half = STEPS // 2
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copytree(Path(stage2_run.output_dir) / f"checkpoint-{half}", out / f"checkpoint-{half}")
    result = train(_config(tiny_dir, data_path, out, resume="latest"))
    assert result.resumed_from == str(out / f"checkpoint-{half}")
    assert result.global_step == STEPS
    # The log restored from the checkpoint ends at `half`; this run continued after it (a restart
    # would log steps 10, 20, ... a second time).
    steps = [h["step"] for h in result.log_history if "loss" in h]
    assert steps == list(range(10, STEPS + 1, 10)), steps
    assert result.train_tokens < 0.75 * stage2_run.train_tokens  # only the second half was trained
    with pytest.raises(ValueError, match="not a checkpoint"):
        train(_config(tiny_dir, data_path, out, resume=str(tmp_path)))


def test_cli_end_to_end_with_config_file(tiny_dir, data_path, tmp_path):
    from memento.cli import app

    config = tmp_path / "train.yaml"
    config.write_text(f"model: {tiny_dir}\ndata: {data_path}\nmax-steps: 50\nlr: 1.0e-3\nprogress: false\n")
    out = tmp_path / "cli-out"
    args = ["train", "--config", str(config), "--output-dir", str(out), "--max-steps", "3"]
    args += ["--stage", "memento", "--mask-delimiters", "--batch-size", "2", "--grad-accum", "1", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)  # --json: stdout is the JSON and nothing else (issue 19)
    assert summary["global_step"] == 3  # the flag overrode the file
    assert "truncated 0, dropped 0" in result.stderr  # data counts shown even with progress off
    saved = json.loads((out / "memento_train.json").read_text())["config"]
    assert saved["masking"]["mask_delimiters"] is True and saved["lr"] == 1e-3
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()

    config.write_text("model: x\ndata: y\nlearning_rate: 3\n")
    bad = CliRunner().invoke(app, ["train", "--config", str(config), "--output-dir", str(out)])
    assert bad.exit_code == 2 and "unknown training option" in bad.output


def test_control_format_trains_without_markers(tiny_dir, data_path, tmp_path):
    result = train(
        _config(tiny_dir, data_path, tmp_path / "control", stage="full", format="control", max_steps=2)
    )
    assert result.global_step == 2


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes(tiny_dir, data_path, tmp_path):
    out = tmp_path / "ddp"
    # `--cpu` selects accelerate's single-process launcher; `--multi_gpu` starts torchrun, which
    # falls back to gloo data parallel on a machine without CUDA.
    config = Path(__file__).resolve().parents[1] / "examples" / "accelerate" / "cpu_2proc.yaml"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    cmd += ["-m", "memento.train", "--model", str(tiny_dir), "--data", str(data_path)]
    cmd += ["--output-dir", str(out), "--stage", "memento", "--max-steps", "4", "--batch-size", "2"]
    cmd += ["--save-steps", "4", "--grad-accum", "1", "--no-progress", "--json"]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "CUDA_VISIBLE_DEVICES": "",
    }
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    assert summary["global_step"] == 4 and summary["world_size"] == 2
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["epoch"] == pytest.approx(4 * 2 * 2 / 48, abs=1e-3)  # 2 ranks x batch 2
    assert AutoModelForCausalLM.from_pretrained(out) is not None
