"""`RLConfig`: everything `memento rl` needs, validated; the same keys work in a YAML/JSON file.

Defaults follow the MEMENTO paper's RL stage (§5, App. A.2.3) where it gives them: CISPO,
beta = 0.001 (KL to the starting SFT model), 8 rollouts per prompt, lr 1e-6 with 10 warm-up steps,
temperature 1.0, rollouts with eviction (keep 0). The paper's 240 prompts per step and 7K-token
block cap are left to the user (`prompts_per_step`, `max_block_tokens`); the clip bounds are
MiniMax-M1's choice: no lower bound on the weight (eps_low = 1) and a cap of 1 + eps_high = 5.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from memento.masking import BlockMaskingConfig
from memento.train.options import options_from_dict

MODES = ("memento", "full")
SCALES = ("group", "none")

# Options that may change between a run and its resumption without changing what the next step does.
RESUMABLE_CHANGES = frozenset(
    {"output_dir", "steps", "resume", "save_steps", "save_total_limit", "progress", "threads", "eval_every",
     "eval_prompts", "eval_limit", "kv_budget_tokens", "rollout_batch_size", "device"}
)  # fmt: skip


@dataclass
class RLConfig:
    """One `memento rl` run. See docs/rl.md for what each option does."""

    model: str
    prompts: str
    output_dir: str
    eval_prompts: str | None = None
    eval_limit: int | None = None
    reward: str = "math"
    format_reward: float = 0.0
    step_reward: str | None = None
    step_weight: float = 1.0
    system_prompt: str | None = None
    group_size: int = 8
    prompts_per_step: int = 32
    steps: int = 100
    lr: float = 1e-6
    warmup_steps: int = 10
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    max_grad_norm: float = 1.0
    beta: float = 0.001
    eps_low: float = 1.0
    eps_high: float = 4.0
    scale_rewards: str = "group"
    score_zero_advantage: bool = False
    updates_per_step: int = 1
    micro_batch_size: int = 8
    temperature: float = 1.0
    max_new_tokens: int = 4096
    max_block_tokens: int = 0
    mode: str = "memento"
    masking: BlockMaskingConfig = field(default_factory=BlockMaskingConfig)
    kv_budget_tokens: int | None = None
    rollout_batch_size: int = 64
    eval_every: int = 10
    guard_every: int = 10
    guard_tol: float = 1e-4
    save_steps: int = 50
    save_total_limit: int | None = None
    seed: int = 0
    resume: str | None = None
    device: str = "cpu"
    threads: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.masking, dict):
            self.masking = BlockMaskingConfig.from_dict(self.masking)
        if not isinstance(self.masking, BlockMaskingConfig):
            raise ValueError(f"masking must be a dict of block-masking options, got {self.masking!r}")
        if self.masking.restart_mode:
            raise ValueError(
                "restart_mode has no single attention mask to score rollouts with; use mode memento"
            )
        if self.max_block_tokens:
            self.masking = BlockMaskingConfig.from_dict(
                {**self.masking.to_dict(), "max_block_tokens": self.max_block_tokens}
            )
        for name, allowed in (("mode", MODES), ("scale_rewards", SCALES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("group_size", "prompts_per_step", "steps", "updates_per_step", "micro_batch_size",
                     "max_new_tokens", "rollout_batch_size", "save_steps"):  # fmt: skip
            _positive_int(self, name)
        for name in ("warmup_steps", "eval_every", "guard_every", "max_block_tokens", "seed"):
            _int_at_least(self, name, 0)
        for name in ("eval_limit", "kv_budget_tokens", "save_total_limit", "threads"):
            if getattr(self, name) is not None:
                _positive_int(self, name)
        for name in ("lr", "temperature", "guard_tol"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        for name in ("beta", "eps_low", "eps_high", "weight_decay", "max_grad_norm", "format_reward",
                     "step_weight"):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        if self.group_size < 2:
            raise ValueError("group_size must be >= 2: advantages compare responses to the same prompt")
        if self.updates_per_step > self.prompts_per_step:
            raise ValueError(
                f"updates_per_step ({self.updates_per_step}) cannot exceed prompts_per_step "
                f"({self.prompts_per_step}): each update takes whole groups"
            )
        if self.resume is not None and not isinstance(self.resume, str):
            raise ValueError(f"resume must be 'latest' or a checkpoint path, got {self.resume!r}")
        if not isinstance(self.score_zero_advantage, bool) or not isinstance(self.progress, bool):
            raise ValueError("score_zero_advantage and progress must be true or false")
        if self.step_reward is not None and (not isinstance(self.step_reward, str) or not self.step_reward):
            raise ValueError(f"step_reward must be MODULE:FUNCTION, got {self.step_reward!r}")
        for name in ("model", "prompts", "output_dir"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name} is required")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RLConfig:
        """Build from a dict (`-` or `_` in keys); unknown keys are errors, not silently dropped."""
        return options_from_dict(cls, values, "rl", required=("model", "prompts", "output_dir"))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["masking"] = self.masking.to_dict()
        return out

    def trajectory_settings(self) -> dict[str, Any]:
        """The settings a checkpoint must share with a run that resumes from it."""
        return {k: v for k, v in self.to_dict().items() if k not in RESUMABLE_CHANGES}

    def trajectory_diff(self, saved: dict[str, Any]) -> list[str]:
        """Settings in which a checkpoint's `saved` ones differ from this run's. An option the
        checkpoint does not mention (it predates the option) counts as that option's default."""
        defaults = {f.name: f.default for f in fields(self) if f.default is not MISSING}
        now = self.trajectory_settings()
        return sorted(k for k in set(saved) | set(now) if saved.get(k, defaults.get(k)) != now.get(k))


def _positive_int(cfg: RLConfig, name: str) -> None:
    _int_at_least(cfg, name, 1)


def _int_at_least(cfg: RLConfig, name: str, low: int) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        kind = "a positive integer" if low == 1 else f"an integer >= {low}"
        raise ValueError(f"{name} must be {kind}, got {value!r}")
