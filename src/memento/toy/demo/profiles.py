"""The demo's settings: task and model sizes and step budgets per profile, and one run's config.

Budgets are optimizer steps, not seconds, so a seed gives the same models and the same report
numbers on any machine, however busy (timings aside). `--scale` multiplies every run's steps.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from memento.toy.tasks import ChainTask

# Why four runs: as in the paper, MEMENTO fine-tunes a model that can already reason. The base
# learns the task from scratch on the traces without markers; from it, the control trains on (same
# format) for as many steps as stage 1 + stage 2 teach the MEMENTO model blocks, mementos and life
# with evictions, so both final models have had the same training on the same problems.
RUNS = ("base", "control", "stage1", "stage2")
STAGES = ("data", *RUNS, "eval", "report")


@dataclass(frozen=True)
class Profile:
    """Sizes and budgets of one demo setting."""

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
    # Share of the training problems drawn from the held-out lengths (test_min..test_max steps);
    # the rest have n uniform in 1..max_steps. Countdown labels >= 10 exist only in long chains.
    long_share: float = 0.0
    # Share of the start states (x, b) held out for testing; a one-digit task (90 start states)
    # needs more than the usual 10% to have enough distinct held-out problems.
    test_fraction: float = 0.1

    @property
    def train_weights(self) -> list[float]:
        """Relative weight of each n = 1..max_steps among the training problems."""
        test_lengths = range(self.test_min_steps, self.test_max_steps + 1)
        return [
            (1 - self.long_share) / self.max_steps
            + (self.long_share / len(test_lengths) if n in test_lengths else 0)
            for n in range(1, self.max_steps + 1)
        ]

    @property
    def task(self) -> ChainTask:
        return ChainTask(
            digits=self.digits,
            block_steps=self.block_steps,
            min_steps=1,
            max_steps=self.max_steps,
            test_fraction=self.test_fraction,
        )

    @property
    def control_steps(self) -> int:
        """The control trains on from the base for exactly as long as stage 1 + stage 2."""
        return self.stage1_steps + self.stage2_steps

    def steps(self, run: str) -> int:
        """Optimizer steps of one of `RUNS`."""
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


PROFILES: dict[str, Profile] = {
    "default": Profile(
        "default", digits=2, block_steps=2, max_steps=12, test_min_steps=10, test_max_steps=12,
        n_train=12000, n_test=200, layers=4, hidden=128, heads=4, kv_heads=2,
        base_steps=800, stage1_steps=300, stage2_steps=430, long_share=0.5,
    ),
    # The same chain lengths and blocks with one-digit numbers (mod 10): the arithmetic is a table a
    # tiny model learns in a few hundred steps, so the quick run's accuracy means something. 90 start
    # states only, so 30% of them are held out (27 starts x 3 lengths = 81 distinct test problems).
    "quick": Profile(
        "quick", digits=1, block_steps=2, max_steps=12, test_min_steps=10, test_max_steps=12,
        n_train=4000, n_test=64, layers=4, hidden=128, heads=4, kv_heads=2,
        base_steps=450, stage1_steps=150, stage2_steps=200, long_share=0.5, test_fraction=0.3,
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
class DemoPaths:
    """Where each stage reads and writes inside the output directory."""

    out: Path

    @property
    def init(self) -> Path:
        return self.out / "work" / "init-model"

    @property
    def train(self) -> Path:
        return self.out / "data" / "train.jsonl"

    @property
    def test(self) -> Path:
        return self.out / "data" / "test.jsonl"

    @property
    def eval(self) -> Path:
        return self.out / "eval"

    def model(self, run: str) -> Path:
        """The model a training run writes: the two final ones are top-level HF directories."""
        return {
            "base": self.out / "work" / "base",
            "control": self.out / "model-control",
            "stage1": self.out / "work" / "stage1",
            "stage2": self.out / "model-memento",
        }[run]


@dataclass(frozen=True)
class DemoConfig:
    """One demo run. `profile`: a name in `PROFILES` or a `Profile` of one's own (e.g.
    `replace(PROFILES["default"], stage2_steps=100)` for an under-trained MEMENTO model). `scale`
    multiplies every training run's steps (2.0 = train twice as long)."""

    out: Path
    profile: str | Profile = "default"
    scale: float = 1.0
    seed: int = 0
    threads: int = 1  # torch CPU threads; not part of the fingerprint (a resume may use others)

    def __post_init__(self) -> None:
        if not isinstance(self.profile, Profile) and self.profile not in PROFILES:
            raise ValueError(f"profile must be one of {sorted(PROFILES)}, got {self.profile!r}")
        if self.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {self.threads}")
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"--scale must be a positive number, got {self.scale}")
        object.__setattr__(self, "out", Path(self.out))

    @property
    def settings(self) -> Profile:
        profile = self.profile if isinstance(self.profile, Profile) else PROFILES[self.profile]
        return profile.scaled(self.scale)

    @property
    def paths(self) -> DemoPaths:
        return DemoPaths(self.out)

    def fingerprint(self) -> dict[str, Any]:
        """What must match for a re-run to resume from stages already on disk. Fields added to
        `Profile` later are left out at their default, so runs made before them still resume."""
        profile = asdict(self.settings)
        for name, default in FIELDS_ADDED_LATER.items():
            if profile[name] == default:
                del profile[name]
        return {"profile": profile, "seed": self.seed}


# Profile fields newer than run directories in use, with their defaults (see `DemoConfig.fingerprint`).
FIELDS_ADDED_LATER = {"test_fraction": 0.1}
