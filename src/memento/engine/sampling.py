"""Sampling parameters and the per-request sampler.

Each request draws from its own seeded `torch.Generator`, so its tokens depend only on its own
logits and seed: the same request gives the same output alone, in any batch, and after being
preempted and recomputed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. `temperature=0` is greedy; `top_k=0`, `top_p=1`, `min_p=0` disable
    those filters; `n` samples per prompt (sample k uses seed `seed + k`). `logprobs=True` fills
    `RequestOutput.logprobs` and `RequestOutput.forced` (see `RequestOutput`); `top_logprobs=k`
    also the k most likely tokens of that same distribution at each step."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    max_new_tokens: int = 512
    n: int = 1
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0 <= self.min_p < 1:
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if not isinstance(self.logprobs, bool):
            raise ValueError(f"logprobs must be true or false, got {self.logprobs!r}")
        if (
            isinstance(self.top_logprobs, bool)
            or not isinstance(self.top_logprobs, int)
            or self.top_logprobs < 0
        ):
            raise ValueError(f"top_logprobs must be an int >= 0, got {self.top_logprobs!r}")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=True")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> tuple[torch.Generator, int]:
    """A generator for one request; without a seed a fresh one is drawn (and returned, so the
    run can be reproduced)."""
    if seed is None:
        seed = random.SystemRandom().randrange(2**63)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator, seed


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p, row by row on float32 logits `[..., V]` (one row
    or a batch of rows that share `params`: every op works along the last dim only)."""
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the top token always stays)
        drop = (probs.cumsum(-1) - probs) >= params.top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    if params.min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < params.min_p * probs.amax(-1, keepdim=True), float("-inf"))
    return logits


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """Pick the next token id from one row of logits."""
    if params.greedy:
        return int(torch.argmax(logits))
    probs = filter_logits(logits.float(), params).softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def sample_rows(
    logits: torch.Tensor, params: SamplingParams, generators: list[torch.Generator]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One token per row of `logits` `[n, V]` (rows sharing `params`): the filters run batched, then
    each row draws from its own generator (so a request's draw never depends on its batch).

    Returns the tokens and, with `params.logprobs`, the log-probability of each drawn token under
    the distribution it was drawn from (after temperature and filters), else None."""
    filtered = filter_logits(logits.float(), params)
    probs = filtered.softmax(-1)
    tokens = torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generators, strict=True)])
    if not params.logprobs:
        return tokens, None
    return tokens, filtered.log_softmax(-1).gather(-1, tokens[:, None])[:, 0]
