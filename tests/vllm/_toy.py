"""Shared helpers for the vLLM tests: a sharp tiny model, prompts, and the HF dense-mask reference."""

from __future__ import annotations

from pathlib import Path

import torch

from memento.masking import BlockMaskingConfig, Eviction, attention_mask, evictions
from memento.tokens import MarkerIds

SHARPEN = 3.0  # q_norm/k_norm weights x3 -> attention logits x9: attention is sharp, evictions matter


def make_sharp_checkpoint(directory: Path) -> Path:
    """The toy Qwen3 with sharpened attention (Qwen3 normalises q/k, so scale their norm weights)."""
    from transformers import AutoModelForCausalLM

    from memento.toy import make_toy_checkpoint

    make_toy_checkpoint(directory, seed=0, layers=2)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_norm.weight.mul_(SHARPEN)
            layer.self_attn.k_norm.weight.mul_(SHARPEN)
    model.save_pretrained(directory)
    return directory


class HFReference:
    """Teacher-forced HF forward (sdpa, fp32) with the Stage-2 mask and original position ids."""

    def __init__(self, model_dir: Path, markers: MarkerIds) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, attn_implementation="sdpa"
        )
        self.model.eval()
        self.markers = markers

    @torch.no_grad()
    def _logprobs(self, ids: list[int], allowed: torch.Tensor) -> torch.Tensor:
        x = torch.tensor([ids])
        pos = torch.arange(len(ids)).unsqueeze(0)
        mask = allowed.unsqueeze(0).unsqueeze(0)
        logits = self.model(input_ids=x, position_ids=pos, attention_mask=mask).logits[0]
        return torch.log_softmax(logits.float(), dim=-1)

    def logprobs(self, ids: list[int], config: BlockMaskingConfig | None) -> torch.Tensor:
        """[L, V] log-probs of the next token at every position under MEMENTO semantics."""
        n = len(ids)
        if config is None:
            return self._logprobs(ids, torch.tril(torch.ones(n, n, dtype=torch.bool)))
        if not config.restart_mode:
            return self._logprobs(ids, attention_mask(ids, self.markers, config))
        return self._restart_logprobs(ids, evictions(ids, self.markers, config))

    def _restart_logprobs(self, ids: list[int], evs: list[Eviction]) -> torch.Tensor:
        """Restart: a query at q sees every eviction triggered <= q applied from its recompute
        point on (the recomputed KV never saw the block); later evictions not at all. Evictions
        sharing a trigger are one restart from the earliest of their recompute points."""
        n = len(ids)
        causal = torch.tril(torch.ones(n, n, dtype=torch.bool))
        out = self._logprobs(ids, causal)
        triggers = sorted({ev.trigger for ev in evs})
        for i, trigger in enumerate(triggers):
            allowed = causal.clone()
            for t in triggers[: i + 1]:
                group = [ev for ev in evs if ev.trigger == t]
                start = min(ev.recompute_from for ev in group)
                for ev in group:
                    allowed[start:, ev.start : ev.end] = False
            rows = self._logprobs(ids, allowed)
            upto = triggers[i + 1] if i + 1 < len(triggers) else n
            out[trigger:upto] = rows[trigger:upto]
        return out
