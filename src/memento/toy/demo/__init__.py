"""`memento demo`: train a tiny MEMENTO model from scratch on a CPU and show the KV sawtooth.

Stages, one module each, run in order by `memento.toy.runner.StageRunner` (each leaves a marker in
DIR/stages/, so a re-run resumes after the last finished one):

    data      demo/data.py      tokenizer, untrained tiny model, train traces, held-out problems
    base      demo/train.py     from scratch on the traces without markers: a model that can reason
    control   demo/train.py     the base trained on in the same format (the Control row)
    stage1    demo/train.py     the base on the Memento traces, full attention
    stage2    demo/train.py     then with the Stage-2 block mask (the MEMENTO model)
    eval      demo/evaluate.py  engine: control in full mode, MEMENTO in memento and restart modes
    report    demo/report.py    table, report.json / report.md, plots

Sizes and step budgets per profile: demo/profiles.py. Checking runs afterwards: demo/repeat.py
(two runs, same numbers?) and demo/seeds.py (several seeds: each, mean, spread). The models end
up in DIR/model-control/ and DIR/model-memento/ as ordinary HF directories. Another study can reuse some of these stages with
budgets of its own, e.g. an under-trained MEMENTO model to start RL from:

    from dataclasses import replace
    from memento.toy.demo import PROFILES, DemoConfig, run_demo

    profile = replace(PROFILES["default"], name="rl-start", stage2_steps=100)
    cfg = DemoConfig(out=Path("rl-start"), profile=profile, seed=0)
    run_demo(cfg, only=("data", "base", "stage1", "stage2"))   # no control, eval or report
    cfg.paths.model("stage2")                                   # rl-start/model-memento
    cfg.paths.test                                              # the held-out problems (JSONL)

A study of another kind (its own task and stages) uses `memento.toy.runner.StageRunner` and
`memento.toy.training.train_run` directly, as this package does.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence

from memento.toy.demo.evaluate import MODE_LABELS, MODES, stage_eval, well_formed
from memento.toy.demo.profiles import PROFILES, RUNS, STAGES, DemoConfig, Profile
from memento.toy.runner import Stage, StageRunner, Ui, quiet_transformers

__all__ = [
    "MODES",
    "MODE_LABELS",
    "PROFILES",
    "RUNS",
    "STAGES",
    "DemoConfig",
    "Profile",
    "Ui",
    "NEEDS",
    "demo_runner",
    "demo_stages",
    "run_demo",
    "well_formed",
]


def demo_stages(cfg: DemoConfig, runner: StageRunner) -> list[Stage]:
    """The demo's stages, in order, bound to `cfg` (for `runner.run`)."""
    from memento.toy.demo.data import stage_data
    from memento.toy.demo.report import stage_report
    from memento.toy.demo.train import stage_train

    ui = runner.ui
    return [
        Stage("data", lambda: stage_data(cfg, ui)),
        *(Stage(run, lambda run=run: stage_train(cfg, ui, run), threads=True) for run in RUNS),
        Stage("eval", lambda: stage_eval(cfg, ui), threads=True),
        Stage("report", lambda: stage_report(cfg, ui, runner)),
    ]


def demo_runner(cfg: DemoConfig, ui: Ui | None = None) -> StageRunner:
    """The stage runner for `cfg.out` (settings checked against a run already there)."""
    return StageRunner(cfg.out, cfg.fingerprint(), threads=cfg.threads, ui=ui, config_name="demo_config.json")


def run_demo(cfg: DemoConfig, ui: Ui | None = None, *, only: Sequence[str] | None = None) -> dict:
    """Run (or resume) the demo's stages and return the report dict (also in DIR/report.json).

    `only`: run just these stages (in the demo's order) and return each one's result instead; a
    stage whose inputs come from a stage neither named nor already finished is refused."""
    import torch

    ui = ui or Ui()
    runner = demo_runner(cfg, ui)
    stages = demo_stages(cfg, runner)
    if only is not None:
        stages = _select(stages, set(only), runner)
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    with quiet_transformers():
        results = runner.run(stages)
    ui.log(f"[dim]this invocation took {time.perf_counter() - started:.0f}s[/dim]")
    if only is not None:
        return results
    return json.loads((cfg.out / "report.json").read_text())


# stage -> the stages whose outputs it reads
NEEDS = {
    "data": (),
    "base": ("data",),
    "control": ("base",),
    "stage1": ("base",),
    "stage2": ("stage1",),
    "eval": ("control", "stage2"),
    "report": ("eval",),
}


def _select(stages: list[Stage], names: set[str], runner: StageRunner) -> list[Stage]:
    unknown = sorted(names - set(STAGES))
    if unknown:
        raise ValueError(f"unknown demo stage(s) {unknown}; stages: {list(STAGES)}")
    for name in names:
        missing = [n for n in NEEDS[name] if n not in names and runner.done(n) is None]
        if missing:
            raise ValueError(f"demo stage {name!r} needs {missing} first (add them, or run them before)")
    return [s for s in stages if s.name in names]
