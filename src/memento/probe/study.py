"""`memento probe`: the dual-information-stream study on the probing toy, end to end, resumable.

Stages (each leaves DIR/stages/<name>.json when done; a re-run resumes after the last finished one):

  data       tokenizer, untrained model, training traces, held-out probe problems (passcode in block T)
  stage1     full attention from scratch (step budget)
  stage2     the Stage-2 block mask from stage 1, checkpoints kept for probing over training
  control    full attention from stage 1 for as many steps as stage 2 (the full-attention control)
  restart    Stage 2 under restart semantics from stage 1 (mementos' KV never saw their block)
  extract    memento KV features of every probe problem, per model and semantics
  probe      MLP and linear probes, several seeds, train/dev/val split by passcode
  patching   memento KV of problem A patched into problem B (same memento text)
  ablation   sampled generations under memento / restart / fair restart (and the demo model's,
             with --demo-run)
  report     report.json, report.md, figures

Everything is budgeted in steps and seeded, so results do not depend on the machine's speed.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

STAGES = ("data", "stage1", "stage2", "control", "restart", "extract", "probe", "patching", "ablation", "report")
TRAINED = ("memento", "control", "restart")  # models trained from stage 1 for the same steps


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
    lr: float = 3e-3
    # probing
    n_probe: int = 1500
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
        checkpoints=1, batch_size=4, n_probe=60, probe_seeds=2, probe_epochs=2, probe_hidden=(16,),
        bootstrap=50, n_patch=6, ablation_samples=3, curve_samples=2, demo_problems=2, demo_samples=1,
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


# --- stage bookkeeping --------------------------------------------------------------------------


class Stages:
    """Marker files: DIR/stages/<name>.json holds the stage's result once it has finished."""

    def __init__(self, out: Path) -> None:
        self.dir = out / "stages"

    def done(self, name: str) -> dict | None:
        path = self.dir / f"{name}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def finish(self, name: str, result: dict) -> dict:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".{name}.json.tmp"
        tmp.write_text(json.dumps(result, indent=2, default=str))
        tmp.replace(self.dir / f"{name}.json")
        return result


def check_resumable(cfg: StudyConfig) -> None:
    """Refuse to mix stages from a run with other settings."""
    path = cfg.out / "probe_config.json"
    want = json.loads(json.dumps(cfg.fingerprint()))
    if path.is_file():
        if json.loads(path.read_text()) != want:
            raise ValueError(
                f"{cfg.out} holds a probe study with other settings ({path}); "
                "pass another --out directory or delete this one to start over"
            )
    else:
        cfg.out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(want, indent=2))


@dataclass
class Ui:
    """Progress lines on a rich console, or nothing (tests)."""

    console: Any = None

    def log(self, message: str) -> None:
        if self.console is not None:
            self.console.print(message)


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


def run_study(cfg: StudyConfig, ui: Ui | None = None) -> dict:
    """Run (or resume) every stage; returns report.json's content."""
    from memento.probe import stages as st

    ui = ui or Ui()
    if cfg.demo_run is not None:
        from memento.probe.ablation import read_demo_run

        read_demo_run(cfg.demo_run)  # validate before any work
    check_resumable(cfg)
    stages = Stages(cfg.out)
    started = time.perf_counter()
    steps: list[tuple[str, Callable[[], dict]]] = [
        ("data", lambda: st.stage_data(cfg, ui)),
        ("stage1", lambda: st.stage_train(cfg, ui, "stage1")),
        ("stage2", lambda: st.stage_train(cfg, ui, "memento")),
        ("control", lambda: st.stage_train(cfg, ui, "control")),
        ("restart", lambda: st.stage_train(cfg, ui, "restart")),
        ("extract", lambda: st.stage_extract(cfg, ui)),
        ("probe", lambda: st.stage_probe(cfg, ui)),
        ("patching", lambda: st.stage_patching(cfg, ui)),
        ("ablation", lambda: st.stage_ablation(cfg, ui)),
    ]
    if cfg.demo_run is not None:
        steps.append(("ablation_demo", lambda: st.stage_ablation_demo(cfg, ui)))
    with _quiet_transformers(), _threads(cfg.threads):
        for name, fn in steps:
            if stages.done(name) is not None:
                ui.log(f"[dim]✓ {name}: already done (resuming)[/dim]")
                continue
            ui.log(f"[bold cyan]▶ {name}[/bold cyan]")
            t0 = time.perf_counter()
            result = fn()
            result["seconds"] = round(time.perf_counter() - t0, 2)
            stages.finish(name, result)
        t0 = time.perf_counter()
        from memento.probe.report import write_report

        report = write_report(cfg, stages, ui)
        stages.finish("report", {"seconds": round(time.perf_counter() - t0, 2)})
    ui.log(f"[dim]this invocation took {time.perf_counter() - started:.0f}s[/dim]")
    return report


@contextlib.contextmanager
def _threads(threads: int):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()

