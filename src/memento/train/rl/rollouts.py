"""Rollouts through `memento.engine` (with eviction), scored and grouped for CISPO.

The engine samples every response under the same block eviction the model will run with, batched
under its KV budget, and reports for each output token the log-prob it was sampled with and
whether it was forced (a `<|block_end|>` imposed by the block cap was not drawn from the policy, so
it carries no loss). Its evictions are kept with the rollout: the trainer's mask is built from them.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from memento.masking import Eviction
from memento.train.rl.rewards import RewardModel, StepReward, Verdict, judge_steps


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
    steps: list[tuple[int, int, float]] = field(default_factory=list)  # step reward spans of `text`
    token_advantages: list[float] | None = None  # per output token, when a step reward is used

    @property
    def steps_right(self) -> float | None:
        """Mean credit of the step reward's spans (None without any)."""
        return sum(c for _, _, c in self.steps) / len(self.steps) if self.steps else None

    @property
    def has_gradient(self) -> bool:
        """Whether any of its tokens has a non-zero advantage."""
        if self.token_advantages is not None:
            return any(a != 0.0 for a in self.token_advantages)
        return self.advantage != 0.0

    @property
    def loss_mask(self) -> list[bool]:
        """Tokens that carry loss: every sampled output token (forced ones excluded)."""
        return [not f for f in self.forced]

    @property
    def loss_tokens(self) -> int:
        return sum(self.loss_mask)


def collect(
    engine,
    outputs,
    answers: Sequence[str],
    reward: RewardModel,
    logprobs: bool = True,
    problems: Sequence[str] | None = None,
    step_reward: StepReward | None = None,
) -> list[Rollout]:
    """`RequestOutput`s -> scored Rollouts; `answers[i]` / `problems[i]` are prompt i's gold
    answer and problem text (`problems` is needed with a `step_reward`). With `logprobs`
    (training rollouts) the outputs must carry the engine's log-probs."""
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
        if step_reward is not None:
            rollout.steps = judge_steps(step_reward, text, problems[out.prompt_index])
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


def token_offsets(tokenizer, ids: Sequence[int], text: str) -> list[tuple[int, int]]:
    """Character span of each token of `ids` in `text` (= their decoding); tokens past the end
    of `text` (a stop token left out of it) get an empty span at its end."""
    pieces = [tokenizer.decode([t], skip_special_tokens=False) for t in ids]
    if not "".join(pieces).startswith(text):  # decoding is not per-token additive: decode prefixes
        pieces, prev = [], ""
        for i in range(len(ids)):
            now = tokenizer.decode(list(ids[: i + 1]), skip_special_tokens=False)
            pieces.append(now[len(prev) :])
            prev = now
    spans, pos = [], 0
    for piece in pieces:
        start = min(pos, len(text))
        pos += len(piece)
        spans.append((start, min(pos, len(text))))
    return spans


def step_advantages(rollouts: Sequence[Rollout], group_size: int, weight: float, tokenizer) -> None:
    """Per-token advantages: each token keeps its response's advantage, and a token inside the
    i-th step span adds `weight` x (that span's credit - the mean credit of the i-th spans of its
    group), so a right step is pushed up and a slip pushed down where it was made, against how
    often the group got that same step right. Sets `token_advantages` of every rollout."""
    for g in range(0, len(rollouts), group_size):
        group = rollouts[g : g + group_size]
        baselines = []
        for i in range(max(len(r.steps) for r in group)):
            credits = [r.steps[i][2] for r in group if i < len(r.steps)]
            baselines.append(sum(credits) / len(credits))
        for r in group:
            adv = [r.advantage] * len(r.output_ids)
            if r.steps:
                offsets = token_offsets(tokenizer, r.output_ids, r.text)
                starts, ends = [a for a, _ in offsets], [b for _, b in offsets]
                for (s, e, credit), baseline in zip(r.steps, baselines, strict=False):
                    # the tokens that overlap [s, e): end after s and start before e
                    for t in range(bisect.bisect_right(ends, s), bisect.bisect_left(starts, e)):
                        adv[t] = r.advantage + weight * (credit - baseline)
            r.token_advantages = adv
