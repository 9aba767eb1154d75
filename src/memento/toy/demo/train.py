"""Stages `base`, `control`, `stage1`, `stage2`: the four training runs, each a fixed number of
optimizer steps through `memento.toy.training.train_run` (i.e. `memento train`).

    run       format   attention        starts from
    base      control  full (stage 1)   the untrained model (learns to reason, no markers)
    control   control  full             base (the Control row: trained on as long as stage 1 + 2)
    stage1    memento  full             base
    stage2    memento  block mask       stage1 (the MEMENTO model)
"""

from __future__ import annotations

from memento.toy.demo.profiles import DemoConfig
from memento.toy.runner import Ui
from memento.toy.training import train_run

# run -> (format, memento train --stage, the run it starts from; None = the untrained model)
PLAN = {
    "base": ("control", "full", None),
    "control": ("control", "full", "base"),
    "stage1": ("memento", "full", "base"),
    "stage2": ("memento", "memento", "stage1"),
}
LABELS = {
    "base": "base (from scratch, no markers)",
    "control": "control (from base, no markers)",
    "stage1": "stage 1 (from base, full attention)",
    "stage2": "stage 2 (memento mask)",
}


def stage_train(cfg: DemoConfig, ui: Ui, run: str) -> dict:
    """One of the four runs; the base learns from scratch at `lr`, the others fine-tune at
    `finetune_lr`."""
    s, paths = cfg.settings, cfg.paths
    fmt, stage, start = PLAN[run]
    return train_run(
        model=paths.init if start is None else paths.model(start),
        data=paths.train,
        out=paths.model(run),
        stage=stage,
        fmt=fmt,
        steps=s.steps(run),
        lr=s.lr if run == "base" else s.finetune_lr,
        seed=cfg.seed,
        batch_size=s.batch_size,
        warmup_steps=s.warmup_steps,
        label=LABELS[run],
        ui=ui,
    )
