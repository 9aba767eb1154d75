"""A direct forward for Llama-family decoders (Qwen3, Qwen2, Llama, Mistral): the same math as the
HF modules, written as plain tensor ops over the model's own weights. Sliding-window layers take
the mask of their window (the engine builds one per window, `memento.masking.in_window`).

At decode time on small and mid-sized models the HF forward spends much of a step in Python
(module calls, hooks, output capturing, mask preparation) rather than in the kernels; running the
layers directly removes that overhead without copying or changing any weight. Which models qualify,
and where each weight sits, is decided by `memento.hf.decoder_parts` (the one place that knows
transformers' module layout); anything else keeps the HF forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from memento.hf import DecoderParts, Norm, decoder_parts


@dataclass
class _Logits:
    logits: torch.Tensor


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _norm(norm: Norm, x: torch.Tensor) -> torch.Tensor:
    if x.dtype == torch.float32:  # the HF RMSNorm computes in fp32: one fused op, same math
        return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.eps)
    return norm.module(x)  # other dtypes: the module itself (its exact casting order)


class DirectForward:
    """`model(input_ids, position_ids, attention_mask, past_key_values, logits_to_keep)` for a
    supported decoder, with a boolean 4-D mask, or `{window: mask}` with one per window in
    `windows` (the window of each layer, None = full), or None (causal over fresh rows of the
    cache), and the engine's cache. Build with `build(model, windows)`, which returns None for a
    model it does not support."""

    def __init__(self, parts: DecoderParts, windows: tuple[int | None, ...]) -> None:
        if len(windows) != len(parts.layers):
            raise ValueError(f"{len(windows)} layer windows for {len(parts.layers)} layers")
        self.parts = parts
        self.windows = windows

    @classmethod
    def build(cls, model, windows: tuple[int | None, ...]) -> DirectForward | None:
        parts = decoder_parts(model)
        return cls(parts, windows) if parts is not None else None

    @torch.inference_mode()
    def __call__(
        self, *, input_ids, position_ids, attention_mask, past_key_values, logits_to_keep=0, use_cache=True
    ) -> _Logits:
        parts = self.parts
        h = parts.embed(input_ids)
        cos, sin = parts.rotary(h, position_ids)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        batch, width = input_ids.shape
        for index, layer in enumerate(parts.layers):
            mask = attention_mask[self.windows[index]] if isinstance(attention_mask, dict) else attention_mask
            x = _norm(layer.input_norm, h)
            q = F.linear(x, layer.q.weight, layer.q.bias).view(batch, width, -1, layer.head_dim)
            k = F.linear(x, layer.k.weight, layer.k.bias).view(batch, width, -1, layer.head_dim)
            v = F.linear(x, layer.v.weight, layer.v.bias).view(batch, width, -1, layer.head_dim)
            if layer.q_norm is not None:
                q, k = _norm(layer.q_norm, q), _norm(layer.k_norm, k)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            if past_key_values.paged_decode:  # a decode step reads the cache's pages in place
                out = past_key_values.decode_attention(q, k, v, index, layer.scaling, self.windows[index])
            else:
                keys, values = past_key_values.update(k, v, index)
                out = F.scaled_dot_product_attention(
                    q,
                    keys,
                    values,
                    attn_mask=mask,
                    is_causal=mask is None and width > 1,  # no mask: a fresh causal prefill
                    scale=layer.scaling,
                    enable_gqa=q.shape[1] != keys.shape[1],
                )
            out = out.transpose(1, 2).reshape(batch, width, -1)
            h = h + F.linear(out, layer.o.weight, layer.o.bias)
            x = _norm(layer.post_attention_norm, h)
            gate = F.linear(x, layer.gate.weight, layer.gate.bias)
            up = F.linear(x, layer.up.weight, layer.up.bias)
            h = h + F.linear(F.silu(gate) * up, layer.down.weight, layer.down.bias)
        if isinstance(logits_to_keep, int):
            h = h[:, -logits_to_keep:] if logits_to_keep else h
        else:
            h = h[:, logits_to_keep]
        h = _norm(parts.norm, h)
        return _Logits(parts.lm_head(h))
