"""`memento rl`: CISPO reinforcement learning with block-masked rollouts (the paper's last stage).

`train_rl(RLConfig(...)) -> RLResult` runs a job in-process; `memento rl` is the CLI. Rollouts come
from `memento.engine` with eviction; `scoring` scores them under the Stage-2 mask built from their
own evictions; `cispo` is the loss. Importing this package does not import transformers.
"""

from memento.train.rl.cispo import cispo_loss
from memento.train.rl.config import RLConfig
from memento.train.rl.trainer import GuardError, RLResult, RLTrainer, train_rl

__all__ = ["GuardError", "RLConfig", "RLResult", "RLTrainer", "cispo_loss", "train_rl"]
