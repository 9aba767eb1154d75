"""Checkpoint selection: the paper starts Stage 2 from the *best* Stage-1 checkpoint on a
validation benchmark. After a run, every `checkpoint-N` is scored — by default its accuracy
(pass@1) on `select_by` through the evaluating engine (`memento.eval`), or by any
`selector(checkpoint_dir) -> float` — and `OUTPUT_DIR/best` links to the winner, so the next stage
is simply `--model OUTPUT_DIR/best`. Scores go to `OUTPUT_DIR/selection.json`; each checkpoint's
generations to `OUTPUT_DIR/selection/checkpoint-N/results.jsonl` (resumable, like `memento eval`).
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from memento.train.sft import SFTConfig

SELECTION_FILE = "selection.json"
BEST_LINK = "best"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def checkpoints(output_dir: str | Path) -> list[Path]:
    """The run's `checkpoint-N` folders, by step."""
    found = [(int(m.group(1)), p) for p in Path(output_dir).iterdir() if (m := _CHECKPOINT.match(p.name))]
    return [p for _, p in sorted(found)]


def benchmark_scorer(cfg: SFTConfig) -> Callable[[Path], float]:
    """pass@1 of a checkpoint on `cfg.select_by` (the paper's sampling settings, `select_n` samples
    per problem — default the paper's for that benchmark — and `select_max_new_tokens`)."""
    import torch

    from memento.eval.benchmarks import load_benchmark
    from memento.eval.metrics import pass1
    from memento.eval.runner import GenerationConfig, ResultsFile, default_samples, generate_results
    from memento.masking import BlockMaskingConfig

    bench = load_benchmark(cfg.select_by, limit=cfg.select_limit)
    mode = cfg.select_mode or ("memento" if cfg.stage == "memento" else "full")
    cuda = torch.cuda.is_available()

    def score(ckpt: Path) -> float:
        config = GenerationConfig(
            model=str(ckpt),
            n=cfg.select_n or default_samples(bench.name),
            max_new_tokens=cfg.select_max_new_tokens,
            seed=cfg.seed,
            dtype="bfloat16" if cuda else "float32",
            device="cuda" if cuda else "cpu",
            masking=_changed(cfg.masking.to_dict(), BlockMaskingConfig().to_dict()),
        )
        results = ResultsFile(Path(cfg.output_dir) / "selection" / ckpt.name / "results.jsonl")
        generate_results(bench, [mode], config, results)
        correct: dict[str, list[bool]] = {}
        for r in results.records:
            if r["mode"] == mode and r["sample"] < config.n:
                correct.setdefault(str(r["id"]), []).append(bool(r["correct"]))
        return pass1(correct)[0]

    score.describe = f"pass@1 on {bench.name} ({len(bench)} problems, mode {mode})"  # type: ignore[attr-defined]
    return score


def _changed(values: dict, defaults: dict) -> dict | None:
    """The options that differ from the defaults (the engine evicts as the stage trained)."""
    return {k: v for k, v in values.items() if v != defaults[k]} or None


def select_checkpoint(cfg: SFTConfig, selector: Callable[[Path], float] | None = None) -> dict:
    """Score every checkpoint of the run, link `best` to the highest (ties: the later step) and write
    selection.json; returns what it wrote."""
    out = Path(cfg.output_dir)
    found = checkpoints(out)
    if not found:
        raise ValueError(
            f"{out}: no checkpoint-N folders to select from (was --save-steps larger than the run?)"
        )
    scorer = selector or benchmark_scorer(cfg)
    scores: dict[str, float] = {}
    for ckpt in found:
        scores[ckpt.name] = float(scorer(ckpt))
        print(f"[memento train] select: {ckpt.name} scores {scores[ckpt.name]:.4f}", file=sys.stderr)
    best = max(found, key=lambda p: (scores[p.name], found.index(p))).name
    link = out / BEST_LINK
    if link.is_symlink() or link.exists():
        link.unlink()
    os.symlink(best, link, target_is_directory=True)  # relative: the run folder can move
    selection = {
        "by": getattr(scorer, "describe", "selector"),
        "benchmark": cfg.select_by,
        "scores": scores,
        "best": best,
        "best_dir": str(link),
    }
    (out / SELECTION_FILE).write_text(json.dumps(selection, indent=2) + "\n")
    print(f"[memento train] best checkpoint: {best} -> {link} (start the next stage with --model {link})",
          file=sys.stderr)  # fmt: skip
    return selection
