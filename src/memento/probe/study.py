"""`memento probe`: the dual-information-stream study on the probing toy, end to end, resumable.

Stages, run by `memento.toy.runner.StageRunner` (each leaves DIR/stages/<name>.json when done; a
re-run resumes after the last finished one; another study's directory is refused):

  data       tokenizer, untrained model, training traces, held-out probe problems (passcode in block T)
  stage1     full attention from scratch (step budget)
  stage2     the Stage-2 block mask from stage 1, checkpoints kept for probing over training
  control    full attention from stage 1 for as many steps as stage 2 (the full-attention control)
  restart    Stage 2 under restart semantics from stage 1 (mementos' KV never saw their block)
  extract    memento KV features of every probe problem, per model and semantics
  probe      MLP and linear probes, several seeds, train/dev/val split by passcode
  patching   memento KV of problem A patched into problem B (same memento text)
  ablation   sampled generations under memento / restart / fair restart
  ablation_demo   the same on a finished `memento demo` run (with --demo-run)

then report.json, report.md and the figures (rewritten on every invocation).

Everything is budgeted in steps and seeded, so results do not depend on the machine's speed.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from memento.toy.runner import Stage, StageRunner, Ui, cpu_threads, quiet_transformers

# (stage name, training run): stage 2 and its two comparisons all start from stage 1, same steps
TRAINING = (("stage1", "stage1"), ("stage2", "memento"), ("control", "control"), ("restart", "restart"))
STAGES = (
    "data",
    *(name for name, _ in TRAINING),
    "extract",
    "probe",
    "patching",
    "ablation",
    "ablation_demo",
)


@dataclass(frozen=True)
class Profile:
    """Sizes and step budgets of one study. `target` is the passcode block (the paper's T2)."""

    name: str
    # model (the paper's toy: 4 layers, d=128)
    layers: int = 4
    hidden: int = 128
    heads: int = 4
    kv_heads: int = 2
    # training data and budgets (steps of `batch_size` traces)
    n_train: int = 8000
    passcode_rate: float = 0.3  # training traces with a passcode in a random block
    stage1_steps: int = 600
    stage2_steps: int = 200
    checkpoints: int = 1  # probed checkpoints inside stage 2 (plus the end of stage 1 and the final model)
    batch_size: int = 8
    lr: float = 3e-3  # stage 1 (from scratch)
    finetune_lr: float = 1.5e-3  # stage 2, control, restart (from stage 1)
    # probing
    n_probe: int = 1500  # held-out problems for the main conditions (masked, direct, restart-recomputed)
    n_probe_controls: int = 750  # ... for the other controls and the training checkpoints
    target: int = 2
    probe_seeds: int = 3
    probe_epochs: int = 15
    probe_hidden: tuple[int, ...] = (128, 64)
    probe_batch: int = 256
    probe_lr: float = 2e-3
    val_fraction: float = 0.2
    dev_fraction: float = 0.1
    bootstrap: int = 1000
    # use and ablation
    n_patch: int = 300
    ablation_samples: int = 200  # generations per mode on the probing toy
    curve_samples: int = 64  # generations per checkpoint for the task-accuracy curve
    demo_problems: int = 100  # held-out problems of the demo model
    demo_samples: int = 4  # samples per demo problem
    max_new_tokens: int = 0  # 0: derived from the longest reference solution

    def __post_init__(self) -> None:
        if not 0 <= self.target < 9:
            raise ValueError("target must leave at least one later block (0..8)")
        if self.stage1_steps < 1 or self.stage2_steps < 1 or self.checkpoints < 0:
            raise ValueError("step budgets must be positive")


PROFILES: dict[str, Profile] = {
    "default": Profile("default"),
    # `memento probe --quick`: seconds; checks shapes, the split by passcode and every stage's plumbing.
    "quick": Profile(
        "quick", layers=2, hidden=32, heads=2, kv_heads=1, n_train=48, stage1_steps=3, stage2_steps=2,
        checkpoints=1, batch_size=4, n_probe=60, n_probe_controls=40, probe_seeds=2, probe_epochs=2,
        probe_hidden=(16,), bootstrap=50, n_patch=6, ablation_samples=3, curve_samples=2, demo_problems=2, demo_samples=1,
        max_new_tokens=24,
    ),
}  # fmt: skip


@dataclass(frozen=True)
class StudyConfig:
    out: Path
    profile: str = "default"
    seed: int = 0
    threads: int = 1
    demo_run: Path | None = None  # a finished `memento demo` directory for the demo-model ablation

    def __post_init__(self) -> None:
        if self.profile not in PROFILES:
            raise ValueError(f"profile must be one of {sorted(PROFILES)}, got {self.profile!r}")
        if self.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {self.threads}")
        object.__setattr__(self, "out", Path(self.out))
        if self.demo_run is not None:
            object.__setattr__(self, "demo_run", Path(self.demo_run))

    @property
    def settings(self) -> Profile:
        return PROFILES[self.profile]

    def fingerprint(self) -> dict[str, Any]:
        return {"profile": asdict(self.settings), "seed": self.seed}


def paths(cfg: StudyConfig) -> dict[str, Path]:
    out = cfg.out
    return {
        "init": out / "models" / "init",
        "stage1": out / "models" / "stage1",
        "memento": out / "models" / "memento",
        "control": out / "models" / "control",
        "restart": out / "models" / "restart",
        "train": out / "data" / "train.jsonl",
        "probe": out / "data" / "probe.json",
        "features": out / "features",
        "results": out / "results",
    }


def study_runner(cfg: StudyConfig, ui: Ui | None = None) -> StageRunner:
    return StageRunner(
        cfg.out, cfg.fingerprint(), threads=cfg.threads, ui=ui, config_name="probe_config.json"
    )


def run_study(cfg: StudyConfig, ui: Ui | None = None) -> dict:
    """Run (or resume) every stage; returns report.json's content. `--demo-run` is checked before
    anything runs, and is not part of the settings: adding it later runs only its stage."""
    from memento.probe import stages as st
    from memento.probe.report import write_report

    if cfg.demo_run is not None:
        from memento.probe.ablation import read_demo_run

        read_demo_run(cfg.demo_run)
    runner = study_runner(cfg, ui)
    ui = runner.ui
    started = time.perf_counter()
    stages = [
        Stage("data", lambda: st.stage_data(cfg, ui)),
        *(Stage(name, lambda run=run: st.stage_train(cfg, ui, run), threads=True) for name, run in TRAINING),
        Stage("extract", lambda: st.stage_extract(cfg, ui), threads=True),
        Stage("probe", lambda: st.stage_probe(cfg, ui), threads=True),
        Stage("patching", lambda: st.stage_patching(cfg, ui), threads=True),
        Stage("ablation", lambda: st.stage_ablation(cfg, ui), threads=True),
    ]
    if cfg.demo_run is not None:
        stages.append(Stage("ablation_demo", lambda: st.stage_ablation_demo(cfg, ui), threads=True))
    with quiet_transformers():
        runner.run(stages)
        with cpu_threads(cfg.threads):
            report = write_report(cfg, runner, ui)
    ui.log(f"[dim]this invocation took {time.perf_counter() - started:.0f}s[/dim]")
    return report
