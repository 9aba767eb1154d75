"""v1 logits processors: the block-length cap, and a scripted-token forcer for tests and demos.

Both use vLLM's public `LogitsProcessor` interface (`--logits-processors`, or `LLM(...,
logits_processors=[...])`). They cannot touch the KV cache; they only steer sampling.
"""

from __future__ import annotations

from typing import Any

import torch

from memento.integrations.vllm import version
from memento.integrations.vllm.config import MementoVllmConfig, load_markers, request_masking
from memento.masking import BlockLengthCap, BlockMaskingConfig

version.check(hooks=False)

from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality  # noqa: E402

#: `SamplingParams(extra_args={FORCE_KEY: {output_index: token_id}})` for `ForcedTokensProcessor`.
FORCE_KEY = "memento_force_tokens"


class _RowProcessor(LogitsProcessor):
    """Keeps one state object per batch row through vLLM's add/remove/move batch updates."""

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        self.rows: dict[int, Any] = {}

    def new_row(self, params: Any, prompt_ids: list[int] | None, output_ids: list[int]) -> Any:
        raise NotImplementedError

    def is_argmax_invariant(self) -> bool:
        return False  # it forces tokens, so it changes greedy results

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.rows.pop(index, None)
        for index, params, prompt_ids, output_ids in batch_update.added:
            row = self.new_row(params, prompt_ids, output_ids)
            if row is None:
                self.rows.pop(index, None)
            else:
                self.rows[index] = row
        for a, b, direction in batch_update.moved:
            ra, rb = self.rows.pop(a, None), self.rows.pop(b, None)
            if ra is not None:
                self.rows[b] = ra
            if rb is not None and direction == MoveDirectionality.SWAP:
                self.rows[a] = rb

    @staticmethod
    def force(logits: torch.Tensor, row: int, token_id: int) -> None:
        value = logits[row, token_id].clone()
        logits[row] = float("-inf")
        logits[row, token_id] = value if torch.isfinite(value) else 0.0


class _CapRow:
    def __init__(self, cap: BlockLengthCap, output_ids: list[int]) -> None:
        self.cap, self.output_ids, self.fed = cap, output_ids, 0


class BlockLengthCapProcessor(_RowProcessor):
    """Forces `<|block_end|>` once an open block holds `max_block_tokens` content tokens.

    The counting rule is `memento.masking.BlockLengthCap`; the limit comes from
    `additional_config["memento"]["max_block_tokens"]` or the request's `extra_args["memento"]`.
    Sync scheduling only (async look-ahead would see the count one token late).
    """

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        super().__init__(vllm_config, device, is_pin_memory)
        self.config = MementoVllmConfig.from_vllm_config(vllm_config)
        self.markers = load_markers(self.config, vllm_config) if self.config.enable else None

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        """Per-request MEMENTO options are checked in the front end, at admission: a bad option
        is a `ValueError` there (HTTP 400 from the server) and never reaches the engine core."""
        request_masking(BlockMaskingConfig(), getattr(sampling_params, "extra_args", None))

    def new_row(self, params: Any, prompt_ids: list[int] | None, output_ids: list[int]) -> _CapRow | None:
        if self.markers is None:
            return None
        limit = request_masking(self.config.masking, getattr(params, "extra_args", None)).max_block_tokens
        if limit <= 0:
            return None
        cap = BlockLengthCap(self.markers, limit)
        for token in prompt_ids or ():
            cap.feed(int(token))
        return _CapRow(cap, output_ids)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows:  # no request has a cap: nothing to do
            return logits
        for index, row in self.rows.items():
            out = row.output_ids
            while row.fed < len(out) and out[row.fed] >= 0:
                row.cap.feed(int(out[row.fed]))
                row.fed += 1
            if row.cap.must_close:
                self.force(logits, index, self.markers.block_end)
        return logits


class _ForceRow:
    def __init__(self, script: dict[int, int], output_ids: list[int]) -> None:
        self.script, self.output_ids = script, output_ids


class ForcedTokensProcessor(_RowProcessor):
    """Test/demo aid: force `extra_args["memento_force_tokens"][i]` as the i-th generated token.

    Lets a random tiny model emit scripted marker sequences so the real token-triggered eviction
    path runs (keys may be strings, as JSON requires).
    """

    def new_row(self, params: Any, prompt_ids: list[int] | None, output_ids: list[int]) -> _ForceRow | None:
        script = (getattr(params, "extra_args", None) or {}).get(FORCE_KEY)
        if not script:
            return None
        return _ForceRow({int(k): int(v) for k, v in script.items()}, output_ids)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        rows, tokens = [], []
        for index, row in self.rows.items():
            token = row.script.get(len(row.output_ids))
            if token is not None:
                rows.append(index)
                tokens.append(token)
        if rows:  # the whole batch at once: a few tensor ops per step, not per row
            index = torch.tensor([rows, tokens], device=logits.device)
            kept = logits[index[0], index[1]]
            kept = torch.where(torch.isfinite(kept), kept, torch.zeros_like(kept))
            logits.index_fill_(0, index[0], float("-inf"))
            logits[index[0], index[1]] = kept
        return logits
