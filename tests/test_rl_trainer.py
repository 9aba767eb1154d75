"""`memento rl` on a toy model: the log-prob guard (passes on the real forward, stops a wrong one),
forced tokens carry no loss, resume takes the same next step, and the run's bookkeeping."""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from engine_helpers import one_thread  # noqa: F401
from memento.format import write_traces
from memento.toy import build_tiny_model, build_tokenizer
from memento.toy.kit import save_toy_model
from memento.train.rl import scoring
from memento.train.rl.cispo import cispo_loss
from memento.train.rl.config import RLConfig
from memento.train.rl.rollouts import group_advantages
from memento.train.rl.trainer import GuardError, RLTrainer, prompt_schedule, train_rl
from train_traces import make_traces

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sft_model(tmp_path_factory) -> Path:
    """A tiny model fine-tuned for ~15 s on a counting task with the Stage-2 mask: it writes blocks
    and mementos (~2 evictions per sampled response), often wrongly (so rewards differ)."""
    from memento.train import SFTConfig, train

    root = tmp_path_factory.mktemp("rl_sft")
    tokenizer = build_tokenizer()
    model = build_tiny_model(tokenizer, layers=2, hidden=48, heads=2, kv_heads=1, intermediate=96, seed=0)
    save_toy_model(root / "init", tokenizer, model)
    write_traces(root / "traces.jsonl", make_traces(400, seed=0))
    cfg = SFTConfig(model=str(root / "init"), data=str(root / "traces.jsonl"), output_dir=str(root / "sft"),
                    stage="memento", max_steps=100, lr=2e-2, batch_size=16, grad_accum=1, warmup_ratio=0.1,
                    progress=False, save_steps=10_000)  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        train(cfg)
    return root / "sft"


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("rl_prompts")
    files = []
    for name, traces in (("train", make_traces(12, seed=1)), ("eval", make_traces(6, seed=2))):
        path = root / f"{name}.jsonl"
        path.write_text(
            "".join(json.dumps({"problem": t.problem, "answer": t.answer}) + "\n" for t in traces)
        )
        files.append(path)
    return files[0], files[1]


def config(sft_model, prompt_files, out, **overrides) -> RLConfig:
    values = dict(
        model=str(sft_model), prompts=str(prompt_files[0]), output_dir=str(out), eval_prompts=str(prompt_files[1]),
        reward="exact", format_reward=1.0, group_size=4, prompts_per_step=3, steps=2, lr=3e-3, warmup_steps=0,
        beta=0.01, max_new_tokens=64, eval_every=2, save_steps=1, progress=False,
    )  # fmt: skip
    values.update(overrides)
    return RLConfig(**values)


def test_guard_passes_on_evicting_rollouts_with_forced_tokens(sft_model, prompt_files, tmp_path):
    trainer = RLTrainer(config(sft_model, prompt_files, tmp_path, max_block_tokens=4))
    trainer._load()
    record = trainer.train_step(1, guard=True)
    assert record["evictions"] > 0, "the rollouts must evict for the guard to mean anything"
    assert record["forced"] > 0, "the block cap must force some <|block_end|>"
    guard = record["guard"]
    assert guard["tokens"] > 100
    assert guard["max_abs"] <= 1e-4 and guard["kl"] <= 1e-8


def test_guard_stops_a_forward_that_sees_evicted_blocks(sft_model, prompt_files, tmp_path, monkeypatch):
    trainer = RLTrainer(config(sft_model, prompt_files, tmp_path, max_block_tokens=4))
    trainer._load()
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    real = scoring.build_batch

    def blind(rows, pad_token_id):  # scores every rollout as if nothing had been evicted
        return real([(p, r, []) for p, r, _ in rows], pad_token_id)

    monkeypatch.setattr("memento.train.rl.trainer.build_batch", blind)
    with pytest.raises(GuardError, match="log-prob guard failed at step 1"):
        trainer.train_step(1, guard=True)
    after = trainer.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the guard must stop before the update"


def test_forced_tokens_carry_no_loss(sft_model, prompt_files, tmp_path):
    trainer = RLTrainer(config(sft_model, prompt_files, tmp_path, max_block_tokens=3, beta=0.0))
    trainer._load()
    rollouts = trainer.rollouts(1)
    rows = [r for r in rollouts if any(r.forced)]
    assert rows, "the block cap must force some tokens"
    batch = trainer._batch(rows)
    logp = scoring.response_logprobs(trainer.model, batch)
    logp.retain_grad()
    width = batch.width
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    forced = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        mask[i, : len(r.output_ids)] = torch.tensor(r.loss_mask)
        forced[i, : len(r.output_ids)] = torch.tensor(r.forced)
    loss, stats = cispo_loss(logp, logp.detach(), torch.ones(len(rows)), mask, eps_low=1.0, eps_high=4.0)
    loss.backward()
    assert stats.tokens == sum(r.loss_tokens for r in rows) == int(mask.sum())
    assert torch.all(logp.grad[forced] == 0)
    assert torch.all(logp.grad[mask] != 0)
    # and a step's loss counts sampled tokens only (every response scored here)
    cfg = config(sft_model, prompt_files, tmp_path / "all", max_block_tokens=3, score_zero_advantage=True)
    trainer = RLTrainer(cfg)
    trainer._load()
    record = trainer.train_step(2)
    assert record["forced"] > 0
    assert record["loss_tokens"] == round((record["length"] - record["forced"]) * 12)


def test_resume_takes_the_same_next_step(sft_model, prompt_files, tmp_path):
    straight = train_rl(config(sft_model, prompt_files, tmp_path / "a"))
    assert straight.train[0]["grad_norm"] > 0  # the step really moved the weights
    train_rl(config(sft_model, prompt_files, tmp_path / "b", steps=1))
    resumed = train_rl(config(sft_model, prompt_files, tmp_path / "b", steps=2, resume="latest"))
    assert resumed.resumed_from == str(tmp_path / "b" / "checkpoint-1")
    timing = {"seconds", "rollout_seconds", "guard"}
    a = {k: v for k, v in straight.train[1].items() if k not in timing}
    b = {k: v for k, v in resumed.train[1].items() if k not in timing}
    assert a == b
    # the first invocation also evaluated at its last step (1)
    assert [e["step"] for e in resumed.evals] == [0, 1, 2] and [e["step"] for e in straight.evals] == [0, 2]
    ea, eb = straight.evals[-1], resumed.evals[-1]
    assert {k: v for k, v in ea.items() if k != "seconds"} == {k: v for k, v in eb.items() if k != "seconds"}
    from safetensors.torch import load_file

    wa, wb = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    lines = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in lines] == [
        ("eval", 0),
        ("train", 1),
        ("eval", 1),
        ("train", 2),
        ("eval", 2),
    ]
    assert (tmp_path / "b" / "curves.png").is_file()


def test_eval_every_zero_evaluates_at_start_and_end(sft_model, prompt_files, tmp_path):
    result = train_rl(config(sft_model, prompt_files, tmp_path, steps=2, eval_every=0, save_steps=5))
    assert [e["step"] for e in result.evals] == [0, 2]
    assert [p.name for p in tmp_path.glob("checkpoint-*")] == ["checkpoint-2"]  # the last step is saved


def test_output_dir_and_resume_settings_are_checked(sft_model, prompt_files, tmp_path):
    cfg = config(sft_model, prompt_files, tmp_path, steps=1, eval_prompts=None)
    train_rl(cfg)
    with pytest.raises(ValueError, match="already holds an rl run"):
        RLTrainer(cfg)
    with pytest.raises(ValueError, match="other settings \\(lr\\)"):
        RLTrainer(replace(cfg, resume="latest", lr=1.0))
    RLTrainer(replace(cfg, resume="latest", steps=5, eval_every=3))  # these may change


def test_prompt_schedule_and_group_advantages():
    steps = [prompt_schedule(10, s, 4, seed=3) for s in (1, 2, 3, 4, 5)]
    assert sorted(steps[0] + steps[1] + steps[2][:2]) == list(range(10))  # each prompt once per epoch
    assert steps == [prompt_schedule(10, s, 4, seed=3) for s in (1, 2, 3, 4, 5)]
    assert prompt_schedule(10, 1, 4, seed=4) != steps[0]
    adv = group_advantages([1, 0, 0, 0, 1, 1, 1, 1], 4)
    assert adv[4:] == [0.0] * 4
    assert adv[0] > 0 > adv[1] and sum(adv[:4]) == pytest.approx(0)
    assert group_advantages([1, 0, 0, 0], 4, "none") == [0.75, -0.25, -0.25, -0.25]


def test_a_run_stopped_before_its_first_checkpoint_does_not_block_the_rerun(
    sft_model, prompt_files, tmp_path
):
    """Issue 19 item 3 for rl: rl_config.json is written once the model loaded; a run killed (or
    failed) before any checkpoint leaves nothing to resume, so the same command must start again."""
    cfg = config(sft_model, prompt_files, tmp_path / "run", steps=1, eval_prompts=None)
    Path(cfg.output_dir).mkdir(parents=True)
    (Path(cfg.output_dir) / "rl_config.json").write_text(json.dumps(cfg.to_dict()))
    RLTrainer(cfg)  # accepted: no checkpoint there


def never_right(response: str, answer: str) -> float:
    return 0.0


def even_digits(response: str, problem: str) -> list[tuple[int, int, float]]:
    return [(i, i + 1, float(int(c) % 2 == 0)) for i, c in enumerate(response) if c.isdigit()]


def test_a_step_reward_gives_a_gradient_where_the_answers_give_none(sft_model, prompt_files, tmp_path):
    plain = config(
        sft_model, prompt_files, tmp_path / "a", reward="test_rl_trainer:never_right", format_reward=0.0
    )
    trainer = RLTrainer(plain)
    trainer._load()
    record = trainer.train_step(1)
    assert record["loss_tokens"] == 0 and record["steps_right"] is None  # every group's rewards are equal
    stepped = replace(plain, output_dir=str(tmp_path / "b"), step_reward="test_rl_trainer:even_digits")
    trainer = RLTrainer(stepped)
    trainer._load()
    rollouts = trainer.rollouts(1)
    r = next(r for r in rollouts if 0.0 < (r.steps_right or 0.0) < 1.0)
    digit = next(i for i, t in enumerate(r.output_ids) if trainer.tokenizer.decode([t]) in "13579")
    assert r.token_advantages[digit] < 0  # an odd digit is pushed down
    record = trainer.train_step(1)
    assert record["loss_tokens"] > 0 and record["grad_norm"] > 0 and 0 < record["steps_right"] < 1


def test_a_checkpoint_from_before_an_option_resumes_at_its_default(tmp_path):
    cfg = RLConfig(model="m", prompts="p", output_dir=str(tmp_path))
    saved = cfg.trajectory_settings()
    old = {k: v for k, v in saved.items() if k not in ("step_reward", "step_weight")}
    assert cfg.trajectory_diff(old) == []
    assert replace(cfg, step_weight=2.0).trajectory_diff(old) == ["step_weight"]
    assert replace(cfg, lr=1e-3).trajectory_diff(saved) == ["lr"]
