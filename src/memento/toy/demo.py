"""`memento demo`: train a tiny MEMENTO model from scratch on a CPU and show the KV sawtooth.

Stages (each leaves a marker in DIR/stages/, so a re-run resumes after the last finished one):
data (tokenizer, tiny base model, traces) -> base (from scratch, full attention, the traces
without markers: a model that can reason) -> control (the base trained on, same format) and
stage1 (the base on Memento traces, full attention) -> stage2 (Stage-2 block mask) -> eval (engine: control in full mode,
the Memento model in memento and restart modes, on held-out problems) -> report (table, JSON,
plots). The models end up in DIR/model-control/ and DIR/model-memento/ as ordinary HF directories.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from memento.format import MARKERS, THINK_END, THINK_START, parse, write_traces
from memento.toy.tasks import TEST, TRAIN, ChainProblem, ChainTask

STAGES = ("data", "base", "control", "stage1", "stage2", "eval", "report")
MODES = ("control", "memento", "restart")  # control = the Control model with full attention
MODE_LABELS = {
    "control": "control (full attention)",
    "memento": "memento",
    "restart": "restart (ablation)",
}


@dataclass(frozen=True)
class Profile:
    """Sizes and budgets of one demo setting. Budgets are optimizer steps (not seconds), so a seed
    gives the same models and the same report numbers on any machine, however busy."""

    name: str
    block_steps: int
    max_steps: int
    test_min_steps: int
    test_max_steps: int
    n_train: int
    n_test: int
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    base_steps: int  # the base reasoner, from scratch
    stage1_steps: int  # MEMENTO stage 1 (full attention), from the base
    stage2_steps: int  # MEMENTO stage 2 (block mask), from stage 1
    warmup_steps: int = 30  # linear warm-up, then a cosine decay to zero at the run's last step
    batch_size: int = 6  # small batches, many steps: what a tiny model learns fastest from on a CPU
    lr: float = 5e-3  # from scratch (base)
    finetune_lr: float = 2e-3  # control, stage 1 and stage 2, starting from the base
    n_examples: int = 3
    eval_batch: int = 32
    max_new: int = 0  # 0 = derived from the longest held-out solution
    digits: int = 3

    @property
    def task(self) -> ChainTask:
        return ChainTask(
            digits=self.digits, block_steps=self.block_steps, min_steps=1, max_steps=self.max_steps
        )

    @property
    def control_steps(self) -> int:
        """The control trains on from the base for exactly as long as stage 1 + stage 2."""
        return self.stage1_steps + self.stage2_steps

    def steps(self, run: str) -> int:
        return {
            "base": self.base_steps,
            "control": self.control_steps,
            "stage1": self.stage1_steps,
            "stage2": self.stage2_steps,
        }[run]

    def scaled(self, scale: float) -> Profile:
        """Every run `scale` times as many steps (at least one each)."""
        if scale == 1.0:
            return self
        return replace(
            self,
            base_steps=max(1, round(self.base_steps * scale)),
            stage1_steps=max(1, round(self.stage1_steps * scale)),
            stage2_steps=max(1, round(self.stage2_steps * scale)),
        )


# Why four runs: as in the paper, MEMENTO fine-tunes a model that can already reason. The base
# learns the task from scratch on the traces without markers; from it, the control trains on (same
# format) for as many steps as stage 1 + stage 2 teach the MEMENTO model blocks, mementos and life
# with evictions, so both final models have had the same training on the same problems.
RUNS = ("base", "control", "stage1", "stage2")


PROFILES: dict[str, Profile] = {
    "default": Profile(
        "default", digits=2, block_steps=2, max_steps=12, test_min_steps=10, test_max_steps=12,
        n_train=12000, n_test=200, layers=4, hidden=128, heads=4, kv_heads=2,
        base_steps=800, stage1_steps=300, stage2_steps=430,
    ),
    "quick": Profile(
        "quick", digits=2, block_steps=2, max_steps=12, test_min_steps=10, test_max_steps=12,
        n_train=4000, n_test=48, layers=4, hidden=128, heads=4, kv_heads=2,
        base_steps=235, stage1_steps=90, stage2_steps=130,
    ),
    # Tests only: seconds, not minutes; checks the plumbing, not the learning.
    "smoke": Profile(
        "smoke", block_steps=1, max_steps=3, test_min_steps=3, test_max_steps=3,
        n_train=64, n_test=4, layers=1, hidden=32, heads=2, kv_heads=1,
        base_steps=12, stage1_steps=6, stage2_steps=6, warmup_steps=3,
        batch_size=8, n_examples=2, eval_batch=4, max_new=48,
    ),
}  # fmt: skip


@dataclass(frozen=True)
class DemoConfig:
    """One demo run. `scale` multiplies every training run's steps (2.0 = train twice as long)."""

    out: Path
    profile: str = "default"
    scale: float = 1.0
    seed: int = 0
    threads: int = 1  # torch CPU threads; not part of the fingerprint (a resume may use others)

    def __post_init__(self) -> None:
        if self.profile not in PROFILES:
            raise ValueError(f"profile must be one of {sorted(PROFILES)}, got {self.profile!r}")
        if self.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {self.threads}")
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"--scale must be a positive number, got {self.scale}")
        object.__setattr__(self, "out", Path(self.out))

    @property
    def settings(self) -> Profile:
        return PROFILES[self.profile].scaled(self.scale)

    def fingerprint(self) -> dict[str, Any]:
        """What must match for a re-run to resume from stages already on disk."""
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


def check_resumable(cfg: DemoConfig) -> None:
    """Refuse to mix stages from a run with other settings (say which, and how to start over)."""
    path = cfg.out / "demo_config.json"
    want = json.loads(json.dumps(cfg.fingerprint()))  # as it reads back (tuples become lists)
    if path.is_file():
        have = json.loads(path.read_text())
        if have != want:
            raise ValueError(
                f"{cfg.out} holds a demo run with other settings ({path}); "
                "pass another --out directory or delete this one to start over"
            )
    else:
        cfg.out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(want, indent=2))


# --- the run ------------------------------------------------------------------------------------


@dataclass
class Ui:
    """Where progress goes: a rich console, or nothing (tests)."""

    console: Any = None
    quiet: bool = False

    def log(self, message: str) -> None:
        if self.console is not None and not self.quiet:
            self.console.print(message)

    def progress(self):
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


def run_demo(cfg: DemoConfig, ui: Ui | None = None) -> dict:
    """Run (or resume) every stage and return the report dict (also written to DIR/report.json)."""
    ui = ui or Ui()
    check_resumable(cfg)
    with _quiet_transformers():
        return _run_stages(cfg, ui)


@contextlib.contextmanager
def _quiet_transformers():
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


def _run_stages(cfg: DemoConfig, ui: Ui) -> dict:
    import torch

    stages = Stages(cfg.out)
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    steps: list[tuple[str, Callable[[], dict]]] = [
        ("data", lambda: stage_data(cfg, ui)),
        ("base", lambda: _threaded(ui, cfg.threads, stage_train, cfg, ui, "base")),
        ("control", lambda: _threaded(ui, cfg.threads, stage_train, cfg, ui, "control")),
        ("stage1", lambda: _threaded(ui, cfg.threads, stage_train, cfg, ui, "stage1")),
        ("stage2", lambda: _threaded(ui, cfg.threads, stage_train, cfg, ui, "stage2")),
        ("eval", lambda: _threaded(ui, cfg.threads, stage_eval, cfg, ui)),
        ("report", lambda: stage_report(cfg, ui, stages)),
    ]
    for name, fn in steps:
        if stages.done(name) is not None:
            ui.log(f"[dim]✓ {name}: already done (resuming)[/dim]")
            continue
        t0 = time.perf_counter()
        ui.log(f"[bold cyan]▶ {name}[/bold cyan]")
        result = fn()
        result["seconds"] = round(time.perf_counter() - t0, 2)
        stages.finish(name, result)
    report = json.loads((cfg.out / "report.json").read_text())
    ui.log(f"[dim]this invocation took {time.perf_counter() - started:.0f}s[/dim]")
    return report


@contextlib.contextmanager
def cpu_threads(ui: Ui, threads: int):
    """Run a stage with `threads` torch threads (restored afterwards).

    Why one by default: a tiny model's matmuls are small, and on a shared CPU threads that wait
    for each other made two threads ~4x slower than one here (1,300 vs 5,100 tokens/s training)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    ui.log(f"  [dim]{threads} CPU thread{'s' if threads > 1 else ''}[/dim]")
    try:
        yield threads
    finally:
        torch.set_num_threads(before)


def _threaded(ui: Ui, threads: int, fn: Callable[..., dict], *args) -> dict:
    with cpu_threads(ui, threads):
        result = fn(*args)
    result["threads"] = threads
    return result


def _paths(cfg: DemoConfig) -> dict[str, Path]:
    out = cfg.out
    return {
        "init": out / "work" / "init-model",
        "base": out / "work" / "base",
        "train_memento": out / "data" / "train.jsonl",
        "test": out / "data" / "test.jsonl",
        "control": out / "model-control",
        "stage1": out / "work" / "stage1",
        "stage2": out / "model-memento",
        "eval": out / "eval",
    }


def task_corpus(task: ChainTask, count: int = 50) -> list[str]:
    """Text the toy tokenizer learns its merges from: its built-in corpus plus task traces, so
    recurring pieces (' x=', ' b=') become single tokens and sequences get shorter."""
    from memento.toy.kit import DEFAULT_CORPUS

    samples = task.traces(task.problems(count, seed=12345))
    return [*DEFAULT_CORPUS, *(f"{t.problem}\n{t.render()}" for t in samples)]


def stage_data(cfg: DemoConfig, ui: Ui) -> dict:
    """Tokenizer + base model + train traces (short problems mixed in) + held-out test problems."""
    from memento.toy.kit import build_tiny_model, build_tokenizer, save_toy_model

    s, paths = cfg.settings, _paths(cfg)
    task = s.task
    tokenizer = build_tokenizer(task_corpus(task))
    model = build_tiny_model(
        tokenizer,
        layers=s.layers,
        hidden=s.hidden,
        heads=s.heads,
        kv_heads=s.kv_heads,
        intermediate=3 * s.hidden,
        max_position=2048,
        seed=cfg.seed,
    )
    save_toy_model(paths["init"], tokenizer, model)
    train = task.problems(s.n_train, split=TRAIN, seed=cfg.seed)
    test = task.problems(
        s.n_test, split=TEST, seed=cfg.seed, min_steps=s.test_min_steps, max_steps=s.test_max_steps
    )
    paths["train_memento"].parent.mkdir(parents=True, exist_ok=True)
    write_traces(paths["train_memento"], task.traces(train))
    with paths["test"].open("w") as fh:
        for p in test:
            fh.write(json.dumps(asdict(p)) + "\n")
    params = sum(p.numel() for p in model.parameters())
    ui.log(
        f"  tokenizer {len(tokenizer)} tokens · model {params / 1e6:.2f}M params "
        f"({s.layers} layers, d={s.hidden}) · {len(train)} train traces (n=1..{s.max_steps}, "
        f"{s.block_steps} steps per block) · {len(test)} held-out problems (n={s.test_min_steps}..{s.test_max_steps})"
    )
    return {"params": params, "vocab": len(tokenizer), "n_train": len(train), "n_test": len(test)}


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


def stage_train(cfg: DemoConfig, ui: Ui, run: str) -> dict:
    """One training run through `memento.train`: base (format control, stage full, from scratch),
    control (the same, from base), stage1 (format memento, stage full, from base) or stage2
    (format memento, stage memento, from stage1). A fixed number of optimizer steps with a linear
    warm-up and a cosine decay by step, so the result depends on the seed, not on the machine."""
    from memento.train import SFTConfig, train

    s, paths = cfg.settings, _paths(cfg)
    steps = s.steps(run)
    fmt, stage, start = {
        "base": ("control", "full", paths["init"]),
        "control": ("control", "full", paths["base"]),
        "stage1": ("memento", "full", paths["base"]),
        "stage2": ("memento", "memento", paths["stage1"]),
    }[run]
    peak_lr = s.lr if run == "base" else s.finetune_lr
    out = paths[run]
    if out.exists():
        shutil.rmtree(out)  # an unfinished earlier attempt: start the run over
    sft = SFTConfig(
        model=str(start),
        data=str(paths["train_memento"]),
        output_dir=str(out),
        stage=stage,
        format=fmt,
        max_steps=steps,
        lr=peak_lr,
        lr_scheduler="cosine",
        warmup_ratio=min(s.warmup_steps, steps - 1) / steps,
        weight_decay=0.01,
        adam_beta2=0.98,
        batch_size=s.batch_size,
        save_steps=steps + 1,  # no intermediate checkpoints
        logging_steps=5,
        seed=cfg.seed,
        progress=False,
    )
    label = {"base": "base (from scratch, no markers)", "control": "control (from base, no markers)",
             "stage1": "stage 1 (from base, full attention)",
             "stage2": "stage 2 (memento mask)"}[run]  # fmt: skip
    with ui.progress() as bar:
        task_id = bar.add_task(f"  train {label}", total=steps, info="")

        def on_step(step: int, total: int, loss: float | None) -> None:
            info = f"step {step}/{total}" + (f" · loss {loss:.3f}" if loss is not None else "")
            bar.update(task_id, completed=step, info=info)

        # The Trainer prints its metrics dicts; the bar and the summary line below replace them.
        with contextlib.redirect_stdout(io.StringIO()):
            result = train(sft, callbacks=[_progress_callback(on_step)])
    for ckpt in out.glob("checkpoint-*"):
        shutil.rmtree(ckpt, ignore_errors=True)
    ui.log(
        f"  {result.global_step} steps in {result.seconds:.0f}s · {result.tokens_per_s:,.0f} tokens/s · "
        f"final loss {result.final_loss if result.final_loss is not None else float('nan'):.4f}"
    )
    return {
        "steps": result.global_step,
        "train_tokens": result.train_tokens,
        "final_loss": result.final_loss,
        "train_seconds": round(result.seconds, 2),
        "tokens_per_s": round(result.tokens_per_s, 1),
    }


# --- evaluation ---------------------------------------------------------------------------------


def read_test(path: Path) -> list[ChainProblem]:
    return [ChainProblem(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


def well_formed(text: str, mode: str, finish_reason: str) -> bool:
    """Finished on its own, `<think>` … `</think>` then a non-empty answer; for Memento modes also
    at least one block, every block closed by a memento, and nothing malformed."""
    if finish_reason != "stop":
        return False
    if mode == "control":
        if any(m in text for m in MARKERS):
            return False
        head, sep, answer = text.partition(THINK_END)
        return bool(sep) and head.lstrip().startswith(THINK_START) and bool(_answer_of(text))
    trace, problems = parse(text)
    return not problems and len(trace.blocks) > 0 and bool(_answer_of(text))


def _answer_of(text: str) -> str:
    _, sep, answer = text.partition(THINK_END)
    if not sep:
        return ""
    return answer.replace("<|endoftext|>", "").replace("<|im_end|>", "").strip()


def stage_eval(cfg: DemoConfig, ui: Ui) -> dict:
    """Generate greedily on the held-out problems with the engine, in the three modes."""
    import torch

    from memento.engine import Engine, SamplingParams

    s, paths = cfg.settings, _paths(cfg)
    task = s.task
    problems = read_test(paths["test"])
    paths["eval"].mkdir(parents=True, exist_ok=True)
    summary = {}
    runs = [("control", paths["control"], "full"), ("memento", paths["stage2"], "memento"),
            ("restart", paths["stage2"], "restart")]  # fmt: skip
    for name, model_dir, mode in runs:
        engine = Engine.from_pretrained(str(model_dir), mode=mode, max_batch_size=s.eval_batch)
        prompts = [engine.chat_prompt([{"role": "user", "content": task.prompt(p)}]) for p in problems]
        sampling = SamplingParams(
            temperature=0.0, max_new_tokens=max_new_tokens(s, engine.tokenizer, problems)
        )
        with ui.progress() as bar, torch.inference_mode():
            task_id = bar.add_task(f"  eval {MODE_LABELS[name]}", total=len(prompts), info="")
            t0 = time.perf_counter()
            outputs = engine.generate(prompts, sampling, progress=lambda _o, t=task_id: bar.advance(t))
            wall = time.perf_counter() - t0
        records = []
        for p, prompt, o in zip(problems, prompts, outputs, strict=True):
            answer = _answer_of(o.text)
            records.append(
                {
                    "problem": asdict(p),
                    "prompt": prompt,
                    "output": o.text,
                    "answer": answer,
                    "expected": task.answer(p),
                    "correct": task.is_correct(p, answer),
                    "well_formed": well_formed(o.text, name, o.finish_reason),
                    "finish_reason": o.finish_reason,
                    "output_tokens": len(o.output_ids),
                    "peak_kv": o.peak_kv,
                    "auc_kv": o.auc_kv,
                    "kv_trace": list(o.kv_trace),
                    **_block_token_counts(engine.tokenizer, o.text, name),
                }
            )
        with (paths["eval"] / f"{name}.jsonl").open("w") as fh:
            for r in records:
                fh.write(json.dumps(r) + "\n")
        tokens = sum(r["output_tokens"] for r in records)
        summary[name] = {
            "wall_seconds": round(wall, 2),
            "tokens_per_s": round(tokens / wall, 1) if wall else 0.0,
        }
        acc = sum(r["correct"] for r in records) / len(records)
        ui.log(f"  {MODE_LABELS[name]}: accuracy {acc:.1%} · {tokens / wall:,.0f} tokens/s")
        del engine
    return summary


def max_new_tokens(s: Profile, tokenizer, problems: list[ChainProblem]) -> int:
    """Room for the longest reference solution plus a quarter (a rambling model stops there)."""
    if s.max_new:
        return s.max_new
    longest = max(len(tokenizer.encode(s.task.trace(p).render(), add_special_tokens=False)) for p in problems)
    return int(longest * 1.25) + 32


def _block_token_counts(tokenizer, text: str, mode: str) -> dict[str, int]:
    """Tokens inside blocks and inside mementos (for the compression ratio)."""
    if mode == "control":
        return {"block_tokens": 0, "memento_tokens": 0}
    trace, _ = parse(text)

    def count(s: str) -> int:
        return len(tokenizer.encode(s, add_special_tokens=False))

    return {
        "block_tokens": sum(count(b.reasoning) for b in trace.blocks),
        "memento_tokens": sum(count(b.memento) for b in trace.blocks),
    }


# --- report -------------------------------------------------------------------------------------


def _load_records(cfg: DemoConfig, mode: str) -> list[dict]:
    path = _paths(cfg)["eval"] / f"{mode}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summarize(records: list[dict], tokens_per_s: float, n_examples: int) -> dict[str, Any]:
    """Per-mode numbers for the table and report.json."""
    n = len(records)
    mean = lambda key: sum(r[key] for r in records) / n if n else 0.0  # noqa: E731
    block = sum(r["block_tokens"] for r in records)
    memento = sum(r["memento_tokens"] for r in records)
    return {
        "n": n,
        "accuracy": mean("correct"),
        "well_formed": mean("well_formed"),
        "peak_kv": mean("peak_kv"),
        "auc_kv": mean("auc_kv"),
        "max_peak_kv": max((r["peak_kv"] for r in records), default=0),
        "output_tokens": mean("output_tokens"),
        "tokens_per_s": tokens_per_s,
        "compression": (block / memento) if memento else None,
        "examples": [
            {k: r[k] for k in ("prompt", "output", "answer", "expected", "correct", "peak_kv", "auc_kv")}
            for r in records[:n_examples]
        ],
    }


def stage_report(cfg: DemoConfig, ui: Ui, stages: Stages) -> dict:
    """Table on the console, report.json / report.md, and the plots."""
    s = cfg.settings
    eval_info = stages.done("eval") or {}
    records = {m: _load_records(cfg, m) for m in MODES}
    modes = {
        m: summarize(records[m], eval_info.get(m, {}).get("tokens_per_s", 0.0), s.n_examples) for m in MODES
    }
    control = modes["control"]
    for m in MODES:
        modes[m]["peak_kv_reduction"] = (
            control["peak_kv"] / modes[m]["peak_kv"] if modes[m]["peak_kv"] else None
        )
        modes[m]["auc_kv_reduction"] = control["auc_kv"] / modes[m]["auc_kv"] if modes[m]["auc_kv"] else None
    timings = {name: (stages.done(name) or {}).get("seconds") for name in STAGES if name != "report"}
    train_info = {name: stages.done(name) for name in RUNS}
    plots = write_plots(cfg.out, records, modes)
    report = {
        "profile": s.name,
        "seed": cfg.seed,
        "settings": asdict(s),
        "task": {
            "name": f"addition chain x <- (x + b) mod {s.task.modulus}, digits least-significant first",
            "example_prompt": s.task.prompt(read_test(_paths(cfg)["test"])[0]),
        },
        "modes": modes,
        "peak_kv_reduction": modes["memento"]["peak_kv_reduction"],
        "training": train_info,
        "timings_s": timings,
        "total_seconds": round(sum(t for t in timings.values() if t), 1),
        "plots": plots,
        "models": {"memento": "model-memento", "control": "model-control"},
    }
    (cfg.out / "report.json").write_text(json.dumps(report, indent=2))
    (cfg.out / "report.md").write_text(render_markdown(report))
    print_table(ui, report)
    return {"plots": plots}


def table_rows(report: dict) -> list[list[str]]:
    rows = []
    for m in MODES:
        r = report["modes"][m]
        comp = f"{r['compression']:.1f}×" if r["compression"] else "–"
        red = f"{r['peak_kv_reduction']:.2f}×" if r["peak_kv_reduction"] else "–"
        rows.append(
            [
                MODE_LABELS[m],
                f"{r['accuracy']:.1%}",
                f"{r['well_formed']:.1%}",
                f"{r['peak_kv']:.0f}",
                red,
                f"{r['auc_kv']:,.0f}",
                f"{r['tokens_per_s']:,.0f}",
                comp,
            ]
        )
    return rows


TABLE_HEADER = ["mode", "accuracy", "well-formed", "peak KV", "peak KV vs control", "AUC KV", "tokens/s",
                "compression"]  # fmt: skip


def print_table(ui: Ui, report: dict) -> None:
    if ui.console is None or ui.quiet:
        return
    from rich.table import Table

    n = report["modes"]["control"]["n"]
    table = Table(title=f"memento demo ({report['profile']}): {n} held-out problems, greedy")
    for i, h in enumerate(TABLE_HEADER):
        table.add_column(h, justify="left" if i == 0 else "right")
    for row in table_rows(report):
        table.add_row(*row)
    ui.console.print(table)
    ui.console.print(f"plots: {', '.join(report['plots'].values())}")


def render_markdown(report: dict) -> str:
    lines = [
        f"# memento demo report ({report['profile']})",
        "",
        f"Task: {report['task']['name']}. Example prompt: `{report['task']['example_prompt']}`",
        "",
        f"{report['modes']['control']['n']} held-out problems, greedy decoding. Peak/AUC KV in tokens "
        "(cached tokens while generating; AUC = sum over generated tokens). Compression = block tokens / "
        "memento tokens.",
        "",
        "| " + " | ".join(TABLE_HEADER) + " |",
        "|" + "---|" * len(TABLE_HEADER),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(report)]
    lines += [
        "",
        "![KV cache while generating one problem](kv_curve.png)",
        "",
        "![accuracy and peak KV](bars.png)",
        "",
    ]
    lines += ["## Training", "", "| run | steps | seconds | tokens/s | final loss |", "|---|---|---|---|---|"]
    for name, info in report["training"].items():
        if info:
            loss = f"{info['final_loss']:.4f}" if info.get("final_loss") is not None else "–"
            lines.append(
                f"| {name} | {info['steps']} | {info['train_seconds']} | {info['tokens_per_s']:,.0f} | {loss} |"
            )
    lines += ["", f"Stage timings (s): {report['timings_s']}; total {report['total_seconds']} s.", ""]
    lines += ["## Examples", ""]
    for m in MODES:
        for ex in report["modes"][m]["examples"][:1]:
            lines += [f"### {MODE_LABELS[m]} — {'correct' if ex['correct'] else 'wrong'}", "", "```",
                      ex["prompt"] + ex["output"], "```", ""]  # fmt: skip
    return "\n".join(lines)


def write_plots(out: Path, records: dict[str, list[dict]], modes: dict[str, dict]) -> dict[str, str]:
    """kv_curve.png (one problem: control vs memento vs restart, the sawtooth) and bars.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # The problem to draw: the longest one both models got right (else the first one).
    pick = 0
    best = -1
    for i, (c, m) in enumerate(zip(records["control"], records["memento"], strict=True)):
        if c["correct"] and m["correct"] and len(m["kv_trace"]) > best:
            pick, best = i, len(m["kv_trace"])
    fig, ax = plt.subplots(figsize=(7, 3.4), dpi=110)
    styles = {"control": ("#888888", "-"), "memento": ("#d62728", "-"), "restart": ("#1f77b4", ":")}
    for m in MODES:
        trace = records[m][pick]["kv_trace"]
        color, ls = styles[m]
        ax.plot(range(len(trace)), trace, ls, color=color, lw=1.4, label=MODE_LABELS[m])
    ax.set_xlabel("generated tokens")
    ax.set_ylabel("KV cache (tokens)")
    n = records["control"][pick]["problem"]["n"]
    ax.set_title(f"KV cache while solving one held-out problem (n={n} steps)")
    ax.legend(frameon=False, fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "kv_curve.png")
    plt.close(fig)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(7, 3), dpi=110)
    names = ["control", "memento", "restart"]
    colors = [styles[m][0] for m in names]
    a1.bar(names, [100 * modes[m]["accuracy"] for m in names], color=colors)
    a1.set_ylabel("exact answers (%)")
    a1.set_ylim(0, 100)
    a2.bar(names, [modes[m]["peak_kv"] for m in names], color=colors)
    a2.set_ylabel("mean peak KV (tokens)")
    for a in (a1, a2):
        a.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "bars.png")
    plt.close(fig)
    return {"kv_curve": str(out / "kv_curve.png"), "bars": str(out / "bars.png")}
