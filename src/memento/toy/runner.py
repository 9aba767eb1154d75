"""A small runner for staged, resumable studies on the CPU (the demo, the probe, RL on the toy).

A study is an output directory and an ordered list of `Stage`s. `StageRunner.run` runs each stage
that has not finished yet, leaves `DIR/stages/<name>.json` with its result once it has (so a re-run
resumes after the last finished stage), and refuses a directory that holds a run with other settings
(`fingerprint`) rather than mixing the two. Stages that train or generate run with a fixed number of
torch threads, so a seed gives the same numbers on every run.

    from memento.toy.runner import Stage, StageRunner, Ui
    from memento.toy.training import train_run

    runner = StageRunner(out, fingerprint={"steps": 200, "seed": 0}, threads=1, ui=Ui(console))
    results = runner.run([
        Stage("data", lambda: write_my_data(out)),            # returns a JSON-able dict
        Stage("stage1", lambda: train_run(model=out / "init", data=out / "train.jsonl",
                                          out=out / "stage1", stage="full", steps=200, seed=0,
                                          ui=runner.ui)),
        Stage("probe", lambda: my_probe(out), threads=True),
    ])
    results["stage1"]["steps"]  # 200; every stage's dict also gets "seconds", "cpu_seconds" (and "threads")

`train_run` (in `memento.toy.training`) is the step-budgeted training helper the stages use.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memento.cpu_numerics import cpu_kernels


@dataclass
class Ui:
    """Where progress goes: a rich console, or nothing (tests)."""

    console: Any = None
    quiet: bool = False

    def log(self, message: str) -> None:
        if self.console is not None and not self.quiet:
            self.console.print(message)

    def progress(self):
        """A rich progress bar group (disabled without a console)."""
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        return Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.percentage:>3.0f}%"),
            TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"),
            console=self.console,
            disable=self.console is None or self.quiet,
            transient=False,
        )


@dataclass(frozen=True)
class Stage:
    """One step of a study: `fn()` does the work and returns a JSON-able dict (its result).

    `threads=True`: run with the runner's torch thread count (training, generation)."""

    name: str
    fn: Callable[[], dict]
    threads: bool = False


class StageRunner:
    """Runs stages in order, skipping those already finished in `out` (marker files)."""

    def __init__(
        self,
        out: Path,
        fingerprint: dict[str, Any],
        *,
        threads: int = 1,
        ui: Ui | None = None,
        config_name: str = "run_config.json",
    ) -> None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.out = Path(out)
        self.fingerprint = json.loads(json.dumps(fingerprint))  # as it reads back (tuples -> lists)
        self.threads = threads
        self.ui = ui or Ui()
        self.config_path = self.out / config_name
        self.stages_dir = self.out / "stages"

    def check(self) -> None:
        """Refuse a directory holding a run with other settings; record ours in a new one."""
        if self.config_path.is_file():
            if json.loads(self.config_path.read_text()) != self.fingerprint:
                raise ValueError(
                    f"{self.out} holds a run with other settings ({self.config_path}); "
                    "pass another --out directory or delete this one to start over"
                )
            return
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.config_path.with_name(f".{self.config_path.name}.tmp")
        tmp.write_text(json.dumps(self.fingerprint, indent=2))
        tmp.replace(self.config_path)

    def done(self, name: str) -> dict | None:
        """The result of a finished stage, or None."""
        path = self.stages_dir / f"{name}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def finish(self, name: str, result: dict) -> dict:
        """Write a stage's marker (atomically: a half-written marker never counts as done)."""
        self.stages_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.stages_dir / f".{name}.json.tmp"
        tmp.write_text(json.dumps(result, indent=2, default=str))
        tmp.replace(self.stages_dir / f"{name}.json")
        return result

    def run(self, stages: Sequence[Stage]) -> dict[str, dict]:
        """Check the fingerprint, then run every unfinished stage; returns each stage's result."""
        self.check()
        results: dict[str, dict] = {}
        for stage in stages:
            previous = self.done(stage.name)
            if previous is not None:
                self.ui.log(f"[dim]✓ {stage.name}: already done (resuming)[/dim]")
                results[stage.name] = previous
                continue
            self.ui.log(f"[bold cyan]▶ {stage.name}[/bold cyan]")
            t0, cpu0 = time.perf_counter(), time.process_time()
            if stage.threads:
                with cpu_threads(self.threads, self.ui):
                    result = stage.fn()
                result["threads"] = self.threads
                result["cpu_kernels"] = cpu_kernels()
            else:
                result = stage.fn()
            result["seconds"] = round(time.perf_counter() - t0, 2)
            # CPU time of this process: about what the stage takes on an otherwise idle machine.
            result["cpu_seconds"] = round(time.process_time() - cpu0, 2)
            results[stage.name] = self.finish(stage.name, result)
        return results


@contextlib.contextmanager
def cpu_threads(threads: int, ui: Ui | None = None) -> Iterator[int]:
    """Run with `threads` torch threads (restored afterwards).

    Why one by default: a tiny model's matmuls are small, and on a shared CPU threads that wait
    for each other made two threads ~4x slower than one here (1,300 vs 5,100 tokens/s training).
    Results depend on the thread count (the order of float sums), not on the machine's load."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    if ui is not None:
        ui.log(f"  [dim]{threads} CPU thread{'s' if threads > 1 else ''}[/dim]")
    try:
        yield threads
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Our rich bars say what is happening; hide transformers' own load/save bars and info logs."""
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
