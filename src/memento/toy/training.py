"""`train_run`: one training run through `memento.train` with a budget in optimizer steps.

A fixed number of steps with a linear warm-up and a cosine decay *by step* (to zero at the last
step), a seed, and nothing that depends on the clock: the same arguments and thread count give the
same model on any machine, however busy. A progress bar shows the step and the loss; the Trainer's
own printing is hidden. Intermediate checkpoints are kept only when asked for (`save_every`).

    from memento.toy.training import train_run

    result = train_run(model="out/init", data="out/train.jsonl", out="out/stage1",
                       stage="full", fmt="memento", steps=300, lr=2e-3, seed=0)
    result  # {"steps": 300, "train_tokens": ..., "final_loss": ..., "train_seconds": ..., "tokens_per_s": ...}

`stage`/`fmt` are `memento train`'s `--stage full|memento` and `--format memento|control`.
"""

from __future__ import annotations

import contextlib
import io
import shutil
from collections.abc import Callable
from pathlib import Path

from memento.toy.runner import Ui


def _progress_callback(on_step: Callable[[int, int, float | None], None]):
    """A Trainer callback that reports (step, max_steps, last logged loss) after every step."""
    from transformers import TrainerCallback

    class StepProgress(TrainerCallback):
        def __init__(self) -> None:
            self.loss: float | None = None

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.loss = float(logs["loss"])

        def on_step_end(self, args, state, control, **kwargs):
            on_step(state.global_step, state.max_steps, self.loss)

    return StepProgress()


def train_run(
    *,
    model: str | Path,
    data: str | Path,
    out: str | Path,
    stage: str,
    fmt: str,
    steps: int,
    lr: float,
    seed: int,
    batch_size: int = 6,
    warmup_steps: int = 30,
    weight_decay: float = 0.01,
    adam_beta2: float = 0.98,
    save_every: int = 0,
    masking: dict | None = None,
    label: str = "",
    ui: Ui | None = None,
) -> dict:
    """Train `model` (an HF directory) on the traces in `data` for exactly `steps` optimizer steps
    and save the result to `out` (an unfinished earlier attempt there is removed first).

    Defaults are what trains the toy models fastest on a CPU: small batches, AdamW with beta2 0.98
    and a little weight decay. `save_every` > 0 keeps `out/checkpoint-N` every N steps (e.g. to
    probe a model during training); 0 keeps only the final model. `masking`: Stage-2 mask options
    (`BlockMaskingConfig` fields, e.g. restart semantics for `stage="memento"`)."""
    from memento.train import SFTConfig, train

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    ui = ui or Ui()
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    sft = SFTConfig(
        model=str(model),
        data=str(data),
        output_dir=str(out),
        stage=stage,
        format=fmt,
        masking=dict(masking or {}),
        max_steps=steps,
        lr=lr,
        lr_scheduler="cosine",
        warmup_ratio=min(warmup_steps, steps - 1) / steps,
        weight_decay=weight_decay,
        adam_beta2=adam_beta2,
        batch_size=batch_size,
        grad_accum=1,  # the demo's own profile: one batch per step, not the paper's global 512
        gradient_checkpointing=False,
        save_steps=save_every if save_every > 0 else steps + 1,
        logging_steps=5,
        seed=seed,
        progress=False,
    )
    with ui.progress() as bar:
        task_id = bar.add_task(f"  train {label or out.name}", total=steps, info="")

        def on_step(step: int, total: int, loss: float | None) -> None:
            info = f"step {step}/{total}" + (f" · loss {loss:.3f}" if loss is not None else "")
            bar.update(task_id, completed=step, info=info)

        # The Trainer prints its metrics dicts; the bar and the summary line below replace them.
        with contextlib.redirect_stdout(io.StringIO()):
            result = train(sft, callbacks=[_progress_callback(on_step)])
    if save_every <= 0:
        for ckpt in out.glob("checkpoint-*"):
            shutil.rmtree(ckpt, ignore_errors=True)
    loss = result.final_loss if result.final_loss is not None else float("nan")
    ui.log(
        f"  {result.global_step} steps in {result.seconds:.0f}s · {result.tokens_per_s:,.0f} tokens/s · "
        f"final loss {loss:.4f}"
    )
    return {
        "steps": result.global_step,
        "train_tokens": result.train_tokens,
        "final_loss": result.final_loss,
        "train_seconds": round(result.seconds, 2),
        "tokens_per_s": round(result.tokens_per_s, 1),
    }
