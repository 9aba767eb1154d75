"""Rollouts through `memento.engine` (with eviction), scored and grouped for CISPO.

The engine samples every response under the same block eviction the model will run with, batched
under its KV budget, and reports for each output token the log-prob it was sampled with and
whether it was forced (a `<|block_end|>` imposed by the block cap was not drawn from the policy, so
it carries no loss). Its evictions are kept with the rollout: the trainer's mask is built from them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from memento.masking import Eviction
from memento.train.rl.rewards import RewardModel, Verdict


@dataclass
class Rollout:
    """One sampled response to one prompt of the step."""

    prompt: int  # index of the prompt in the step
    sample: int
    prompt_ids: list[int]
    output_ids: list[int]
    sampling_logprobs: list[float]
    forced: list[bool]
    evictions: list[Eviction]
    finish_reason: str
    text: str  # the response without its final stop token, markers visible
    peak_kv: int  # most cached tokens while sampling it, with eviction
    full_kv: int  # what full attention would have cached for the same tokens
    verdict: Verdict = field(default_factory=lambda: Verdict(0.0, False, False))
    advantage: float = 0.0

    @property
    def loss_mask(self) -> list[bool]:
        """Tokens that carry loss: every sampled output token (forced ones excluded)."""
        return [not f for f in self.forced]

    @property
    def loss_tokens(self) -> int:
        return sum(self.loss_mask)


def collect(
    engine, outputs, answers: Sequence[str], reward: RewardModel, logprobs: bool = True
) -> list[Rollout]:
    """`RequestOutput`s -> scored Rollouts; `answers[i]` is prompt i's gold answer. With
    `logprobs` (training rollouts) the outputs must carry the engine's log-probs."""
    rollouts = []
    for out in outputs:
        if logprobs and (out.logprobs is None or out.forced is None):
            raise RuntimeError("the engine returned no log-probs: sample with SamplingParams(logprobs=True)")
        finished = out.finish_reason == "stop"
        body = out.output_ids[:-1] if finished else out.output_ids
        text = engine.tokenizer.decode(body, skip_special_tokens=False)
        rollout = Rollout(
            prompt=out.prompt_index,
            sample=out.sample,
            prompt_ids=list(out.prompt_ids),
            output_ids=list(out.output_ids),
            sampling_logprobs=list(out.logprobs) if logprobs else [],
            forced=list(out.forced) if logprobs else [False] * len(out.output_ids),
            evictions=list(out.evictions),
            finish_reason=out.finish_reason,
            text=text,
            peak_kv=out.peak_kv,
            full_kv=len(out.prompt_ids) + len(out.output_ids) - 1,
        )
        rollout.verdict = reward(text, answers[out.prompt_index], finished)
        rollouts.append(rollout)
    return rollouts


def group_advantages(rewards: Sequence[float], group_size: int, scale: str = "group") -> list[float]:
    """Â = reward - mean of its group, divided by the group's std with `scale="group"` (GRPO).
    A group whose rewards are all equal gets zero advantages (it carries no policy gradient)."""
    if len(rewards) % group_size:
        raise ValueError(f"{len(rewards)} rewards do not split into groups of {group_size}")
    r = torch.tensor(rewards, dtype=torch.float64).view(-1, group_size)
    adv = r - r.mean(dim=1, keepdim=True)
    if scale == "group":
        adv = adv / (r.std(dim=1, keepdim=True) + 1e-4)
    elif scale != "none":
        raise ValueError(f"scale must be group or none, got {scale!r}")
    return [float(a) for a in adv.view(-1)]
