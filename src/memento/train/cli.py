"""`memento train`: flags and/or a YAML/JSON config file -> `SFTConfig` -> `train()`.

Every flag defaults to "not given" so that a config file supplies values and flags override them.
torch/transformers are imported inside the command to keep `memento --help` fast.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import typer

# flags that shape the Stage-2 mask (the parameter holding each): refused with --stage full
MASKING_FLAGS = {
    "--masking-config": "masking_config",
    "--keep-last-n-blocks": "keep_last_n_blocks",
    "--mask-delimiters": "mask_delimiters",
}
STAGE_HELP = "full = Stage 1 (causal attention); memento = Stage 2 (block mask, as the engine evicts)."


def train_command(
    model: str = typer.Option(None, "--model", help="HF causal LM directory (any architecture)."),
    data: Path = typer.Option(None, "--data", help="Memento traces, JSONL (problem, blocks, answer)."),
    output_dir: Path = typer.Option(None, "--output-dir", help="Where checkpoints and the final model go."),
    stage: str = typer.Option(None, "--stage", help=STAGE_HELP + " [default: full]"),
    fmt: str = typer.Option(None, "--format", help="memento, or control (no markers; the Control row)."),
    config: Path = typer.Option(None, "--config", help="YAML/JSON file with the same keys as the flags."),
    system_prompt: str = typer.Option(None, "--system-prompt", help="System prompt (none by default)."),
    max_length: int = typer.Option(None, "--max-length", help="Token cap per sample [default: 32768]."),
    overlong: str = typer.Option(None, "--overlong", help="truncate | drop samples over --max-length."),
    masking_config: str = typer.Option(None, "--masking-config", help="Block-masking options, JSON or file."),
    keep_last_n_blocks: int = typer.Option(
        None, "--keep-last-n-blocks", help="Stage-2 mask: blocks kept [0]."
    ),
    mask_delimiters: bool = typer.Option(
        None, "--mask-delimiters/--no-mask-delimiters", help="Stage-2 mask: also hide block delimiters."
    ),
    attention: str = typer.Option(None, "--attention", help="auto | sdpa | eager | flex (CUDA) [auto]."),
    flex_threshold: int = typer.Option(
        None, "--flex-threshold", help="auto: flex on CUDA above this many tokens [4096]."
    ),
    max_steps: int = typer.Option(None, "--max-steps", help="Optimizer steps (overrides --epochs)."),
    epochs: float = typer.Option(None, "--epochs", help="Epochs [5]."),
    lr: float = typer.Option(None, "--lr", help="Peak learning rate [8e-5]."),
    batch_size: int = typer.Option(None, "--batch-size", help="Per-device batch size [1]."),
    global_batch_size: int = typer.Option(
        None, "--global-batch-size", help="Samples per optimizer step, over all processes [512]."
    ),
    grad_accum: int = typer.Option(
        None, "--grad-accum", help="Gradient accumulation steps [derived from --global-batch-size]."
    ),
    warmup_ratio: float = typer.Option(None, "--warmup-ratio", help="Warmup fraction of steps [0.05]."),
    weight_decay: float = typer.Option(None, "--weight-decay", help="AdamW weight decay [0]."),
    save_steps: int = typer.Option(None, "--save-steps", help="Checkpoint every N steps [50]."),
    save_total_limit: int = typer.Option(None, "--save-total-limit", help="Keep at most N checkpoints."),
    logging_steps: int = typer.Option(None, "--logging-steps", help="Log every N steps [10]."),
    seed: int = typer.Option(None, "--seed", help="Random seed [42]."),
    resume: str = typer.Option(
        None, "--resume", help="'latest' (newest checkpoint in --output-dir) or a checkpoint path."
    ),
    gradient_checkpointing: bool = typer.Option(
        None,
        "--gradient-checkpointing/--no-gradient-checkpointing",
        help="Trade compute for memory [on with CUDA, off on CPU].",
    ),
    select_by: Path = typer.Option(
        None,
        "--select-by",
        help="Benchmark JSONL: score every checkpoint at the end; OUTPUT_DIR/best = the best.",
    ),
    select_mode: str = typer.Option(
        None, "--select-mode", help="full | memento | restart for --select-by [the stage's: full / memento]."
    ),
    select_n: int = typer.Option(
        None, "--select-n", help="Samples per problem for --select-by [the paper's]."
    ),
    select_limit: int = typer.Option(
        None, "--select-limit", help="Only the first N problems of --select-by."
    ),
    select_max_new_tokens: int = typer.Option(
        None, "--select-max-new-tokens", help="Token budget per --select-by answer [32000]."
    ),
    bf16: bool = typer.Option(None, "--bf16/--no-bf16", help="bf16 mixed precision [auto: on with CUDA]."),
    progress: bool = typer.Option(None, "--progress/--no-progress", help="Progress bar and log lines."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Supervised fine-tuning, Stage 1 (--stage full) or Stage 2 (--stage memento), on any HF causal LM.

    Runs unchanged under `accelerate launch` (data parallel, DeepSpeed, FSDP): see docs/train.md."""
    flags = {
        "model": model,
        "data": str(data) if data else None,
        "output_dir": str(output_dir) if output_dir else None,
        "stage": stage,
        "format": fmt,
        "system_prompt": system_prompt,
        "max_length": max_length,
        "overlong": overlong,
        "attention": attention,
        "flex_threshold": flex_threshold,
        "max_steps": max_steps,
        "epochs": epochs,
        "lr": lr,
        "batch_size": batch_size,
        "global_batch_size": global_batch_size,
        "grad_accum": grad_accum,
        "warmup_ratio": warmup_ratio,
        "weight_decay": weight_decay,
        "save_steps": save_steps,
        "save_total_limit": save_total_limit,
        "logging_steps": logging_steps,
        "seed": seed,
        "resume": resume,
        "gradient_checkpointing": gradient_checkpointing,
        "bf16": bf16,
        "progress": progress,
        "select_by": str(select_by) if select_by else None,
        "select_mode": select_mode,
        "select_n": select_n,
        "select_limit": select_limit,
        "select_max_new_tokens": select_max_new_tokens,
    }
    from memento.user_errors import reported

    resume = f"checkpoints so far are in {output_dir}; rerun with --resume latest to continue"
    with reported("train", resume=resume if output_dir else None):
        from memento.train.options import masking_options, merge_options
        from memento.train.sft import SFTConfig

        masking = masking_options(masking_config, keep_last_n_blocks, mask_delimiters)
        if global_batch_size is not None and grad_accum is not None:
            raise ValueError(
                "give --global-batch-size or --grad-accum, not both (the first derives the second)"
            )
        cfg = SFTConfig.from_dict(merge_options(config, flags, masking))
        typed = {"masking_config": masking_config, "keep_last_n_blocks": keep_last_n_blocks,
                 "mask_delimiters": mask_delimiters}  # fmt: skip
        given = [flag for flag, name in MASKING_FLAGS.items() if typed[name] is not None]
        if given and cfg.stage != "memento":
            raise ValueError(f"{given[0]} shapes the Stage-2 mask and has no effect with --stage full; "
                             "drop it or use --stage memento")  # fmt: skip
        from memento.train.sft import train

        # Library chatter (the trainer's log dicts, progress) goes to stderr: stdout holds the result.
        with contextlib.redirect_stdout(sys.stderr):
            result = train(cfg)
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return
    if as_json:
        out = result.to_dict()
        out.pop("log_history")
        typer.echo(json.dumps(out, default=str))
    else:
        loss = "n/a" if result.final_loss is None else f"{result.final_loss:.4f}"
        typer.echo(
            f"done: {result.global_step} steps, final loss {loss}, "
            f"{result.tokens_per_s:,.0f} tokens/s -> {result.output_dir}"
        )


def register(app: typer.Typer) -> None:
    """Add `train` to the `memento` command."""
    app.command("train")(train_command)


def main() -> None:
    """Stand-alone entry (`python -m memento.train`), e.g. for `accelerate launch -m memento.train`."""
    from memento.console import plain_help_when_piped

    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    plain_help_when_piped(app)
    app.command()(train_command)
    app()
