"""`memento rl`: flags and/or a YAML/JSON config file -> `RLConfig` -> `train_rl()`; `--demo` runs
the toy demonstration instead (`memento.toy.rl_demo`).

Every flag defaults to "not given" so a config file supplies values and flags override them.
torch/transformers are imported inside the command to keep `memento --help` fast.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer


def rl_command(
    model: str = typer.Option(
        None, "--model", help="Starting checkpoint (a MEMENTO Stage-2 model, any HF causal LM)."
    ),
    prompts: Path = typer.Option(
        None, "--prompts", help="Training prompts, JSONL with problem and answer fields."
    ),
    output_dir: Path = typer.Option(
        None, "--output-dir", help="Checkpoints, metrics, curves and the final model."
    ),
    config: Path = typer.Option(None, "--config", help="YAML/JSON file with the same keys as the flags."),
    eval_prompts: Path = typer.Option(None, "--eval-prompts", help="Held-out prompts (greedy accuracy, KV)."),
    eval_limit: int = typer.Option(None, "--eval-limit", help="Use the first N held-out prompts."),
    eval_every: int = typer.Option(
        None, "--eval-every", help="Evaluate every N steps (0: start and end) [10]."
    ),
    reward: str = typer.Option(None, "--reward", help="exact | math | choice | MODULE:FUNCTION [math]."),
    format_reward: float = typer.Option(
        None, "--format-reward", help="Bonus for a well-formed response [0]."
    ),
    step_reward: str = typer.Option(
        None, "--step-reward", help="Per-step credit MODULE:FUNCTION -> [(start, end, credit)] [none]."
    ),
    step_weight: float = typer.Option(None, "--step-weight", help="Weight of --step-reward [1]."),
    system_prompt: str = typer.Option(None, "--system-prompt", help="System prompt (none by default)."),
    group_size: int = typer.Option(None, "--group-size", help="Responses per prompt [8]."),
    prompts_per_step: int = typer.Option(None, "--prompts-per-step", help="Prompts per step [32]."),
    steps: int = typer.Option(None, "--steps", help="RL steps [100]."),
    lr: float = typer.Option(None, "--lr", help="Learning rate [1e-6]."),
    warmup_steps: int = typer.Option(None, "--warmup-steps", help="Linear warm-up steps [10]."),
    beta: float = typer.Option(None, "--beta", help="KL weight to the starting model [0.001]."),
    eps_low: float = typer.Option(
        None, "--eps-low", help="Weight clip: lower bound 1 - eps_low [1.0 = none]."
    ),
    eps_high: float = typer.Option(None, "--eps-high", help="Weight clip: upper bound 1 + eps_high [4.0]."),
    scale_rewards: str = typer.Option(None, "--scale-rewards", help="group (divide by group std) | none."),
    score_zero_advantage: bool = typer.Option(
        None,
        "--score-zero-advantage/--skip-zero-advantage",
        help="Also score responses whose group rewards are all equal (only their KL term) [skip].",
    ),
    updates_per_step: int = typer.Option(
        None, "--updates-per-step", help="Optimizer steps per rollout batch [1]."
    ),
    micro_batch_size: int = typer.Option(
        None, "--micro-batch-size", help="Responses per forward/backward [8]."
    ),
    temperature: float = typer.Option(None, "--temperature", help="Sampling temperature [1.0]."),
    max_new_tokens: int = typer.Option(None, "--max-new-tokens", help="Response length cap [4096]."),
    max_block_tokens: int = typer.Option(
        None, "--max-block-tokens", help="Block cap: force <|block_end|> [off]."
    ),
    mode: str = typer.Option(None, "--mode", help="memento (evict; default) | full (no eviction, baseline)."),
    masking_config: str = typer.Option(None, "--masking-config", help="Block-masking options, JSON or file."),
    keep_last_n_blocks: int = typer.Option(None, "--keep-last-n-blocks", help="Blocks kept [0]."),
    mask_delimiters: bool = typer.Option(
        None, "--mask-delimiters/--no-mask-delimiters", help="Also evict block delimiters (match training)."
    ),
    kv_budget_tokens: int = typer.Option(None, "--kv-budget-tokens", help="Engine KV budget for rollouts."),
    rollout_batch_size: int = typer.Option(
        None, "--rollout-batch-size", help="Requests decoded at once [64]."
    ),
    guard_every: int = typer.Option(
        None, "--guard-every", help="Log-prob guard every N steps (0: first only) [10]."
    ),
    guard_tol: float = typer.Option(
        None, "--guard-tol", help="Largest allowed |trainer - engine| log-prob [1e-4]."
    ),
    save_steps: int = typer.Option(None, "--save-steps", help="Checkpoint every N steps [50]."),
    save_total_limit: int = typer.Option(None, "--save-total-limit", help="Keep at most N checkpoints."),
    seed: int = typer.Option(None, "--seed", help="Seed for prompt order and sampling [0]."),
    resume: str = typer.Option(
        None, "--resume", help="'latest' (newest checkpoint in --output-dir) or a path."
    ),
    device: str = typer.Option(None, "--device", help="cpu | cuda | cuda:N [cpu]."),
    threads: int = typer.Option(None, "--threads", help="torch CPU threads."),
    progress: bool = typer.Option(None, "--progress/--no-progress", help="A line per step."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    demo: bool = typer.Option(False, "--demo", help="Run the toy demonstration (see docs/rl.md)."),
    out: Path = typer.Option(Path("memento-rl-demo"), "--out", help="--demo: output directory."),
    smoke: bool = typer.Option(
        False, "--smoke", hidden=True, help="--demo: seconds-long plumbing check (tests)."
    ),
) -> None:
    """CISPO reinforcement learning with block-masked rollouts (the MEMENTO paper's last stage).

    Rollouts run through memento.engine with eviction; the update scores them with the Stage-2
    mask built from the same evictions. See docs/rl.md."""
    if demo:
        _run_demo(out, seed, threads, smoke, as_json)
        return
    flags = {
        "model": model,
        "prompts": str(prompts) if prompts else None,
        "output_dir": str(output_dir) if output_dir else None,
        "eval_prompts": str(eval_prompts) if eval_prompts else None,
        "eval_limit": eval_limit,
        "eval_every": eval_every,
        "reward": reward,
        "format_reward": format_reward,
        "step_reward": step_reward,
        "step_weight": step_weight,
        "system_prompt": system_prompt,
        "group_size": group_size,
        "prompts_per_step": prompts_per_step,
        "steps": steps,
        "lr": lr,
        "warmup_steps": warmup_steps,
        "beta": beta,
        "eps_low": eps_low,
        "eps_high": eps_high,
        "scale_rewards": scale_rewards,
        "score_zero_advantage": score_zero_advantage,
        "updates_per_step": updates_per_step,
        "micro_batch_size": micro_batch_size,
        "temperature": temperature,
        "max_new_tokens": max_new_tokens,
        "max_block_tokens": max_block_tokens,
        "mode": mode,
        "kv_budget_tokens": kv_budget_tokens,
        "rollout_batch_size": rollout_batch_size,
        "guard_every": guard_every,
        "guard_tol": guard_tol,
        "save_steps": save_steps,
        "save_total_limit": save_total_limit,
        "seed": seed,
        "resume": resume,
        "device": device,
        "threads": threads,
        "progress": progress,
    }
    from memento.user_errors import reported

    with reported("rl", resume="rerun the same command with --resume latest to continue"):
        from memento.train.options import masking_options, merge_options
        from memento.train.rl.config import RLConfig

        masking = masking_options(masking_config, keep_last_n_blocks, mask_delimiters)
        cfg = RLConfig.from_dict(merge_options(config, flags, masking))
        typed = {"--masking-config": masking_config, "--keep-last-n-blocks": keep_last_n_blocks,
                 "--mask-delimiters": mask_delimiters}  # fmt: skip
        given = [flag for flag, value in typed.items() if value is not None]
        if given and cfg.mode == "full":
            raise ValueError(
                f"{given[0]} has no effect with --mode full (no eviction); drop it or use --mode memento"
            )
        from memento.train.rl.trainer import GuardError, RLTrainer

        trainer = RLTrainer(cfg, log=typer.echo if cfg.progress and not as_json else None)
        try:
            result = trainer.run()
        except GuardError as exc:  # not a usage error: the run itself found an inconsistency
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from exc
    if as_json:
        typer.echo(json.dumps(result.to_dict()))
    else:
        last = result.evals[-1] if result.evals else None
        held = f", held-out accuracy {last['accuracy']:.1%}" if last else ""
        typer.echo(f"done: step {result.step}{held} -> {result.output_dir}")


def _run_demo(out: Path, seed: int | None, threads: int | None, smoke: bool, as_json: bool) -> None:
    from memento.toy.rl_demo import RLDemoConfig, run_rl_demo
    from memento.user_errors import reported

    with reported("rl --demo", resume="rerun the same command: finished stages and RL steps are kept"):
        from memento.user_errors import check_output_dir

        check_output_dir(out, "--out")
        cfg = RLDemoConfig(out=out, seed=0 if seed is None else seed, threads=1 if threads is None else threads,
                           profile="smoke" if smoke else "default")  # fmt: skip
        report = run_rl_demo(cfg, log=None if as_json else typer.echo)
    if as_json:
        typer.echo(json.dumps(report))


def register(app: typer.Typer) -> None:
    """Add `rl` to the `memento` command."""
    app.command("rl")(rl_command)
