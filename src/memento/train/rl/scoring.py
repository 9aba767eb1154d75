"""Per-token log-probs of sampled responses, from one dense forward under the Stage-2 mask.

A rollout generated with eviction must be scored by a forward that sees exactly what the engine
saw when it sampled each token. The mask is therefore built from the rollout's *own* evictions
(the engine's `BlockTracker` output, at original positions): key `k` is visible to query `q` iff
`k <= q < kill[k]`, `kill[k]` being the first trigger that evicted `k`. Rows are right-padded and
keep positions `0..L-1`, the positions the engine used (no left padding to shift them); a padded key
is seen by no real query and a padded query sees only itself (the collator's convention).
The policy, the old policy and the reference model are all scored through this one function.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from memento.masking import Eviction
from memento.train.collator import dense_mask_from_kill_times, padded_kill_times


def kill_times_from_evictions(length: int, evictions: Sequence[Eviction]) -> torch.LongTensor:
    """`kill[k]` = first query position that may not see key `k` (`length` if none)."""
    kill = torch.full((length,), length, dtype=torch.long)
    for ev in evictions:
        if ev.recompute_from is not None:
            raise ValueError("restart-mode rollouts have no single attention mask; roll out in memento mode")
        span = kill[ev.start : ev.end]
        span.clamp_(max=ev.trigger)
    return kill


@dataclass
class ScoringBatch:
    """Right-padded rows (prompt + response), their kill times, and where each response starts."""

    input_ids: torch.LongTensor  # (B, L)
    kill: torch.LongTensor  # (B, L)
    prompt_lens: list[int]
    response_lens: list[int]

    @property
    def width(self) -> int:
        """Longest response: the second dim of every per-token tensor of this batch."""
        return max(self.response_lens)

    def response_mask(self) -> torch.BoolTensor:
        """(B, width): True on real response tokens."""
        lens = torch.tensor(self.response_lens)
        return torch.arange(self.width)[None, :] < lens[:, None]

    def targets(self) -> torch.LongTensor:
        """(B, width) response token ids (0 on padding)."""
        out = torch.zeros(len(self.prompt_lens), self.width, dtype=torch.long)
        for b, (p, n) in enumerate(zip(self.prompt_lens, self.response_lens, strict=True)):
            out[b, :n] = self.input_ids[b, p : p + n]
        return out


def build_batch(
    rows: Sequence[tuple[Sequence[int], Sequence[int], Sequence[Eviction]]], pad_token_id: int
) -> ScoringBatch:
    """Rows of (prompt ids, response ids, evictions of the whole sequence) -> a ScoringBatch."""
    if not rows:
        raise ValueError("nothing to score")
    seqs, kills, prompt_lens, response_lens = [], [], [], []
    for prompt, response, evictions in rows:
        if not prompt or not response:
            raise ValueError("every scored row needs a non-empty prompt and response")
        ids = [int(t) for t in (*prompt, *response)]
        seqs.append(ids)
        kills.append(kill_times_from_evictions(len(ids), evictions))
        prompt_lens.append(len(prompt))
        response_lens.append(len(response))
    length = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), length), pad_token_id, dtype=torch.long)
    for b, ids in enumerate(seqs):
        input_ids[b, : len(ids)] = torch.tensor(ids)
    return ScoringBatch(input_ids, padded_kill_times(kills, length), prompt_lens, response_lens)


def response_logprobs(model, batch: ScoringBatch, temperature: float = 1.0, swap=None) -> torch.Tensor:
    """(B, width) log pi(response token | everything the engine let it see), at `temperature`
    (the distribution the engine sampled from); 0 on padding. Differentiable w.r.t. the model.

    The mask is dense `(B, 1, L, L)`, run through `memento_sdpa` (`memento.hf.AttentionSwap`, pass
    one to reuse it); on long rows this is O(L^2) memory per row."""
    from memento.hf import AttentionSwap

    if temperature <= 0:
        raise ValueError(f"scoring needs a temperature > 0, got {temperature}")
    swap = swap or AttentionSwap(model)
    device = next(model.parameters()).device
    input_ids = batch.input_ids.to(device)
    rows, length = input_ids.shape
    mask = dense_mask_from_kill_times(batch.kill.to(device))
    # Only logits that predict a response token are needed: positions >= shortest prompt - 1.
    first = min(batch.prompt_lens) - 1
    keep = length - first
    with swap.active():
        out = model(
            input_ids=input_ids,
            position_ids=torch.arange(length, device=device).expand(rows, length),
            attention_mask=mask,
            use_cache=False,
            logits_to_keep=keep,
        )
    logits = out.logits  # (B, keep, V): position first + i predicts token first + i + 1
    width = batch.width
    starts = torch.tensor(batch.prompt_lens, device=device) - 1 - first
    index = (starts[:, None] + torch.arange(width, device=device)[None, :]).clamp(max=keep - 1)
    picked = logits.gather(1, index[:, :, None].expand(-1, -1, logits.shape[-1])).float()
    logp = (picked / temperature).log_softmax(-1)
    targets = batch.targets().to(device)
    token_logp = logp.gather(-1, targets[:, :, None])[:, :, 0]
    return token_logp * batch.response_mask().to(device)
