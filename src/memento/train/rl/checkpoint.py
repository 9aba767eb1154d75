"""RL checkpoints: `checkpoint-N/` holds the policy (an ordinary HF directory with its tokenizer)
and `rl_state.pt` (optimizer state, metric history, RNG, the settings that shaped the run).

A checkpoint is written under a temporary name and renamed when complete, so a run stopped while
saving never leaves a half-written checkpoint that `--resume latest` would pick up.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "rl_state.pt"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in `output_dir`, oldest first."""
    if not output_dir.is_dir():
        return []
    found = []
    for path in output_dir.iterdir():
        m = _NAME.match(path.name)
        if m and (path / STATE_FILE).is_file():
            found.append((int(m.group(1)), path))
    return sorted(found)


def resolve_resume(resume: str | None, output_dir: Path) -> Path | None:
    """`latest` -> the newest checkpoint in `output_dir` (None: start fresh); a path -> itself."""
    if not resume:
        return None
    if resume == "latest":
        found = checkpoints(output_dir)
        return found[-1][1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise ValueError(
            f"{path}: not an rl checkpoint (no {STATE_FILE}); pass 'latest' or a checkpoint-N dir"
        )
    return path


def save_checkpoint(
    output_dir: Path,
    step: int,
    model,
    tokenizer,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    keep: int | None = None,
) -> Path:
    """Write `checkpoint-{step}` atomically; keep only the newest `keep` checkpoints."""
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    payload = {**state, "step": step, "optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state()}
    torch.save(payload, tmp / STATE_FILE)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    if keep is not None:
        for _, old in checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_state(path: Path) -> dict[str, Any]:
    """The `rl_state.pt` of a checkpoint (tensors and plain Python values only)."""
    return torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
