"""Stage `data`: the local tokenizer, the untrained tiny model, the training traces and the held-out
test problems (all from the seed; nothing is downloaded)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from memento.format import write_traces
from memento.toy.demo.profiles import DemoConfig
from memento.toy.runner import Ui
from memento.toy.tasks import TEST, TRAIN, ChainProblem, ChainTask


def task_corpus(task: ChainTask, count: int = 50) -> list[str]:
    """Text the toy tokenizer learns its merges from: its built-in corpus plus task traces, so
    recurring pieces (' x=', ' b=') become single tokens and sequences get shorter."""
    from memento.toy.kit import DEFAULT_CORPUS

    samples = task.traces(task.problems(count, seed=12345))
    return [*DEFAULT_CORPUS, *(f"{t.problem}\n{t.render()}" for t in samples)]


def stage_data(cfg: DemoConfig, ui: Ui) -> dict:
    """Tokenizer + initial model + train traces (short problems mixed in) + held-out test problems."""
    from memento.toy.kit import build_tiny_model, build_tokenizer, save_toy_model

    s, paths = cfg.settings, cfg.paths
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
    save_toy_model(paths.init, tokenizer, model)
    weights = s.train_weights if s.long_share else None  # None: uniform, as drawn before long_share
    train = task.problems(s.n_train, split=TRAIN, seed=cfg.seed, weights=weights)
    test = task.problems(
        s.n_test, split=TEST, seed=cfg.seed, min_steps=s.test_min_steps, max_steps=s.test_max_steps
    )
    paths.train.parent.mkdir(parents=True, exist_ok=True)
    write_traces(paths.train, task.traces(train))
    write_test(paths.test, test)
    params = sum(p.numel() for p in model.parameters())
    long = f", {s.long_share:.0%} drawn from n={s.test_min_steps}..{s.test_max_steps}" if s.long_share else ""
    ui.log(
        f"  tokenizer {len(tokenizer)} tokens · model {params / 1e6:.2f}M params "
        f"({s.layers} layers, d={s.hidden}) · {len(train)} train traces (n=1..{s.max_steps}{long}, "
        f"{s.block_steps} steps per block) · {len(test)} held-out problems "
        f"(n={s.test_min_steps}..{s.test_max_steps})"
    )
    return {"params": params, "vocab": len(tokenizer), "n_train": len(train), "n_test": len(test)}


def write_test(path: Path, problems: list[ChainProblem]) -> None:
    with path.open("w") as fh:
        for p in problems:
            fh.write(json.dumps(asdict(p)) + "\n")


def read_test(path: Path) -> list[ChainProblem]:
    return [ChainProblem(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
