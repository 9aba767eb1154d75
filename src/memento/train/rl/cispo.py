"""The CISPO objective (MiniMax-M1; the MEMENTO paper's RL stage, §5 Eq. 1).

Per loss token t of a sampled response with group advantage Â:

    loss_t = -sg(clip(r_t, 1 - eps_low, 1 + eps_high)) * Â * log pi(t)  +  beta * KL_t
    r_t    = exp(log pi(t) - log pi_old(t))
    KL_t   = exp(ref_t - log pi(t)) - (ref_t - log pi(t)) - 1      (k3 estimator, >= 0)

and the loss is the sum over every loss token of the step divided by their number (token-level
normalisation: a long response weighs as many tokens as it has, not as one sequence). Unlike
PPO's clip, CISPO clips the importance *weight* and stops its gradient, so every token keeps a
gradient through log pi, clipped or not.

Bounds are relative (1 - eps_low, 1 + eps_high); TRL's `loss_type="cispo"` instead reads
`epsilon_high` as the absolute cap on the weight and has no lower bound.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CispoStats:
    """Sums over the loss tokens of one call (add them up over micro-batches, then divide)."""

    tokens: int
    policy_sum: float  # sum of the policy-gradient term
    kl_sum: float  # sum of KL_t (0 without a reference)
    clipped_low: int  # tokens whose ratio was below 1 - eps_low
    clipped_high: int  # tokens whose ratio was above 1 + eps_high
    ratio_sum: float


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from samples of pi: unbiased and never negative."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


def cispo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float,
    eps_high: float,
    beta: float = 0.0,
    ref_logp: torch.Tensor | None = None,
    num_tokens: int | float | None = None,
) -> tuple[torch.Tensor, CispoStats]:
    """CISPO loss over a `(B, T)` batch of per-token log-probs.

    `logp` carries the gradient; `old_logp` (the policy that sampled) and `ref_logp` are constants.
    `advantages` is `(B,)` (one per response) or `(B, T)`. `mask` marks the tokens that carry loss
    (sampled response tokens: not the prompt, not padding, not tokens the engine forced).
    `num_tokens` is the normaliser, by default the loss tokens here; pass the step's total when
    the step is split into micro-batches, so that their gradients add up to the step's."""
    if eps_low < 0 or eps_high < 0:
        raise ValueError(f"eps_low and eps_high must be >= 0, got {eps_low}, {eps_high}")
    if beta and ref_logp is None:
        raise ValueError("beta > 0 needs the reference log-probs")
    mask = mask.to(logp.dtype)
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    old_logp = old_logp.detach()
    ratio = torch.exp(logp.detach() - old_logp)
    weight = ratio.clamp(min=1.0 - eps_low, max=1.0 + eps_high)
    per_token = -weight * advantages * logp
    policy_sum = (per_token.detach() * mask).sum()
    kl_sum = torch.zeros((), dtype=logp.dtype, device=logp.device)
    if ref_logp is not None:
        kl = k3_kl(logp, ref_logp.detach())
        kl_sum = (kl.detach() * mask).sum()
        if beta:
            per_token = per_token + beta * kl
    count = int(mask.sum().item())
    denom = float(count if num_tokens is None else num_tokens)
    loss = (per_token * mask).sum() / max(denom, 1.0)
    live = mask.bool()
    stats = CispoStats(
        tokens=count,
        policy_sum=float(policy_sum),
        kl_sum=float(kl_sum),
        clipped_low=int((live & (ratio < 1.0 - eps_low)).sum()),
        clipped_high=int((live & (ratio > 1.0 + eps_high)).sum()),
        ratio_sum=float((ratio * mask).sum()),
    )
    return loss, stats
