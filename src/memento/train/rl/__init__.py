"""`memento rl`: CISPO reinforcement learning with block-masked rollouts (the paper's last stage).

`train_rl(RLConfig(...)) -> RLResult` runs a job in-process; `memento rl` is the CLI. Rollouts come
from `memento.engine` with eviction; `scoring` scores them under the Stage-2 mask built from their
own evictions; `cispo` is the loss. Importing this package imports neither torch nor transformers:
the names below load on first use (PEP 562), so `memento --help` and argument errors stay fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from memento.train.rl.cispo import cispo_loss
    from memento.train.rl.config import RLConfig
    from memento.train.rl.trainer import GuardError, RLResult, RLTrainer, train_rl

_WHERE = {
    "cispo_loss": "memento.train.rl.cispo",
    "RLConfig": "memento.train.rl.config",
    "GuardError": "memento.train.rl.trainer",
    "RLResult": "memento.train.rl.trainer",
    "RLTrainer": "memento.train.rl.trainer",
    "train_rl": "memento.train.rl.trainer",
}
__all__ = ["GuardError", "RLConfig", "RLResult", "RLTrainer", "cispo_loss", "train_rl"]


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'memento.train.rl' has no attribute {name!r}")
