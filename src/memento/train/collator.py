"""Batching for the two SFT stages.

Stage 1 (`full`): ordinary causal attention; a 2D padding mask lets the model build it.
Stage 2 (`memento`): the block mask from `memento.masking` (the code the engine evicts with), in
its compact per-key form: `kill[b, k]` = first query that may no longer see key `k`. The dense
`(B, 1, L, L)` mask and the flex_attention BlockMask are both derived from it, so they agree. A
model with sliding-window layers gets one dense mask per window (`memento.masking.in_window`, the
engine's definition), which `memento.hf.memento_sdpa` hands to each layer by its window.

Restart semantics (`masking.restart_mode`): each row becomes its `memento.masking.virtual_sequence`
(recomputed tokens appear twice, at their original positions; later tokens read the copies), with a
dense mask over the entries. The loss is on the entries that produced the sampled tokens; the
copies are keys only. This trains a model for exactly what restart inference computes.

Padding (right side): a padded key is visible to no real query, and a padded query sees only
itself, so no softmax row is empty (sdpa would give NaN) and no real row is affected.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from memento.masking import BlockMaskingConfig, kill_times, mask_from_kill_times, virtual_sequence
from memento.tokens import MarkerIds
from memento.train.data import IGNORE_INDEX, Sample

STAGES = ("full", "memento")
MASK_FORMATS = ("dense", "kill_times")


def padded_kill_times(rows: Sequence[torch.Tensor], length: int) -> torch.LongTensor:
    """Stack per-row kill times to `(B, length)`; padded key `k` gets `k + 1` (seen by itself only).

    Real keys keep their kill time, which is at most the row length, so padded queries never see
    them."""
    out = torch.arange(1, length + 1, dtype=torch.long).repeat(len(rows), 1)
    for b, kill in enumerate(rows):
        out[b, : kill.shape[0]] = kill
    return out


def dense_mask_from_kill_times(kill: torch.Tensor, window: int | None = None) -> torch.BoolTensor:
    """`(B, L)` kill times -> `(B, 1, L, L)` bool mask (True = attend): `k <= q < kill[b, k]`, and
    `q - k < window` on a sliding-window layer. A padded query keeps its own key in any window."""
    return mask_from_kill_times(kill, window=window).unsqueeze(1)


@dataclass
class MementoCollator:
    """Pads a list of samples into a batch for `stage` ("full" or "memento").

    Stage 2 emits `attention_mask` as a dense `(B, 1, L, L)` bool mask (`mask_format="dense"`), or
    the compact `kill_times` `(B, L)` for the trainer to turn into a flex_attention BlockMask on
    the device (`mask_format="kill_times"`). Position ids are always explicit: `0..L-1` per row.
    `return_lengths` adds the real row lengths (`lengths`, popped by the trainer to count tokens).

    `layer_windows` (`memento.hf.layer_windows(model.config)`): with any sliding-window layer,
    Stage 2 also emits `memento_masks = {window: (B, 1, L, L) mask}` for `memento.hf.memento_sdpa`
    (dense format only), and `attention_mask` is the mask of the first layer's window.
    """

    pad_token_id: int
    stage: str = "full"
    markers: MarkerIds | None = None
    masking: BlockMaskingConfig | None = None
    mask_format: str = "dense"
    pad_to_multiple_of: int | None = None
    return_lengths: bool = False
    layer_windows: tuple[int | None, ...] = ()

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        if self.mask_format not in MASK_FORMATS:
            raise ValueError(f"mask_format must be one of {MASK_FORMATS}, got {self.mask_format!r}")
        if self.stage == "memento" and self.markers is None:
            raise ValueError("stage 'memento' needs the marker ids (MarkerIds.from_tokenizer)")
        if self.masking is None:
            self.masking = BlockMaskingConfig()
        self.layer_windows = tuple(self.layer_windows)
        if self.sliding and self.mask_format != "dense":
            raise ValueError(
                "sliding-window layers need one dense mask per window; the kill_times (flex) format "
                "does not carry windows yet: use sdpa"
            )
        if self.restart and self.mask_format != "dense":
            raise ValueError("restart semantics need the dense mask (no kill-time form exists for them)")
        if self.restart and self.sliding:
            raise ValueError("restart semantics are not supported for models with sliding-window layers")

    @property
    def sliding(self) -> bool:
        return any(w is not None for w in self.layer_windows)

    @property
    def restart(self) -> bool:
        return self.stage == "memento" and self.masking.restart_mode

    def __call__(self, features: Sequence[Sample | Mapping]) -> dict[str, torch.Tensor]:
        rows = [_as_pair(f) for f in features]
        if self.restart:
            return self._restart_batch(rows)
        length = max(len(ids) for ids, _ in rows)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = len(rows)
        input_ids = torch.full((batch, length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
        padding = torch.zeros((batch, length), dtype=torch.long)
        for b, (ids, lab) in enumerate(rows):
            input_ids[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            labels[b, : len(lab)] = torch.tensor(lab, dtype=torch.long)
            padding[b, : len(ids)] = 1
        out = {
            "input_ids": input_ids,
            "labels": labels,
            "position_ids": torch.arange(length, dtype=torch.long).repeat(batch, 1),
        }
        if self.return_lengths:
            out["lengths"] = padding.sum(1)
        if self.stage == "full":
            out["attention_mask"] = padding
            return out
        kill = padded_kill_times([kill_times(ids, self.markers, self.masking) for ids, _ in rows], length)
        if self.mask_format == "kill_times":
            out["kill_times"] = kill
        elif self.sliding:
            windows = tuple(dict.fromkeys(self.layer_windows))
            out["memento_masks"] = {w: dense_mask_from_kill_times(kill, w) for w in windows}
            out["attention_mask"] = out["memento_masks"][windows[0]]
        else:
            out["attention_mask"] = dense_mask_from_kill_times(kill)
        return out

    def _restart_batch(self, rows: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        """Rows as virtual sequences. HF shifts labels by one entry, so entry e carries the target
        of entry e-1: the token after e-1's position when e-1 produced logits, else -100."""
        virtual = [virtual_sequence(ids, self.markers, self.masking) for ids, _ in rows]
        length = max(len(v) for v in virtual)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = len(rows)
        input_ids = torch.full((batch, length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((batch, length), dtype=torch.long)
        mask = torch.eye(length, dtype=torch.bool).repeat(batch, 1, 1)  # padding sees itself
        for b, ((ids, lab), v) in enumerate(zip(rows, virtual, strict=True)):
            n = len(v)
            input_ids[b, :n] = torch.tensor([ids[p] for p in v.positions], dtype=torch.long)
            position_ids[b, :n] = torch.tensor(v.positions, dtype=torch.long)
            position_ids[b, n:] = torch.arange(len(ids), len(ids) + length - n)
            mask[b, :n, :n] = v.visible
            for e, p in enumerate(v.positions[: n - 1]):
                if v.first[p] == e and p + 1 < len(lab):
                    labels[b, e + 1] = lab[p + 1]
        out = {
            "input_ids": input_ids,
            "labels": labels,
            "position_ids": position_ids,
            "attention_mask": mask.unsqueeze(1),
        }
        if self.return_lengths:
            out["lengths"] = torch.tensor([len(ids) for ids, _ in rows])
        return out


def _as_pair(feature: Sample | Mapping) -> tuple[list[int], list[int]]:
    if isinstance(feature, Sample):
        return feature.input_ids, feature.labels
    ids = list(feature["input_ids"])
    return ids, list(feature.get("labels", ids))
