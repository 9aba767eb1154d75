"""A direct forward for Llama-family decoders (Qwen3, Qwen2, Llama): the same math as the HF
modules, written as plain tensor ops over the model's own weights.

At decode time on small and mid-sized models the HF forward spends much of a step in Python
(module calls, hooks, output capturing, mask preparation) rather than in the kernels; running the
layers directly removes that overhead without copying or changing any weight. Anything this file
does not recognise exactly (another architecture, sliding windows, hooks, quantised layers, a
non-SiLU MLP) keeps the HF forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED = ("qwen3", "qwen2", "llama")


@dataclass
class _Logits:
    logits: torch.Tensor


def _plain(module, kind: type) -> bool:
    return type(module) is kind and not (module._forward_hooks or module._forward_pre_hooks)


def _supported(model) -> bool:
    config = model.config
    if getattr(config, "model_type", None) not in SUPPORTED or getattr(config, "hidden_act", None) != "silu":
        return False
    if getattr(config, "use_sliding_window", False) or getattr(config, "pretraining_tp", 1) != 1:
        return False
    if any(t != "full_attention" for t in getattr(config, "layer_types", None) or ()):
        return False
    if any(hasattr(m, "_hf_hook") or m._forward_hooks or m._forward_pre_hooks for m in model.modules()):
        return False
    base = getattr(model, "model", None)
    if base is None or not all(hasattr(base, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return False
    if not (_plain(base.embed_tokens, nn.Embedding) and _plain(getattr(model, "lm_head", None), nn.Linear)):
        return False
    for layer in base.layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        names = ("q_proj", "k_proj", "v_proj", "o_proj")
        if attn is None or mlp is None or not (hasattr(attn, "scaling") and hasattr(attn, "head_dim")):
            return False
        if not all(_plain(getattr(attn, n, None), nn.Linear) for n in names):
            return False
        if not all(_plain(getattr(mlp, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj")):
            return False
        norms = [layer.input_layernorm, layer.post_attention_layernorm]
        norms += [getattr(attn, n) for n in ("q_norm", "k_norm") if hasattr(attn, n)]
        if not all(hasattr(n, "weight") and hasattr(n, "variance_epsilon") for n in norms):
            return False
    return True


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class DirectForward:
    """`model(input_ids, position_ids, attention_mask, past_key_values, logits_to_keep)` for a
    supported decoder, with a boolean 4-D mask (or None: causal over fresh rows of the cache) and
    the engine's cache. Build with `build(model)`,
    which returns None for a model it does not support."""

    def __init__(self, model) -> None:
        self.model = model
        self.base = model.model
        self.layers = list(self.base.layers)

    @classmethod
    def build(cls, model) -> DirectForward | None:
        return cls(model) if _supported(model) else None

    @staticmethod
    def _norm(module, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # the HF RMSNorm computes in fp32: one fused op, same math
            return F.rms_norm(x, (x.shape[-1],), module.weight, module.variance_epsilon)
        return module(x)  # other dtypes: the module itself (its exact casting order)

    @torch.inference_mode()
    def __call__(
        self, *, input_ids, position_ids, attention_mask, past_key_values, logits_to_keep=0, use_cache=True
    ) -> _Logits:
        h = self.base.embed_tokens(input_ids)
        cos, sin = self.base.rotary_emb(h, position_ids)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        batch, width = input_ids.shape
        for index, layer in enumerate(self.layers):
            attn, mlp = layer.self_attn, layer.mlp
            x = self._norm(layer.input_layernorm, h)
            q = F.linear(x, attn.q_proj.weight, attn.q_proj.bias).view(batch, width, -1, attn.head_dim)
            k = F.linear(x, attn.k_proj.weight, attn.k_proj.bias).view(batch, width, -1, attn.head_dim)
            v = F.linear(x, attn.v_proj.weight, attn.v_proj.bias).view(batch, width, -1, attn.head_dim)
            if hasattr(attn, "q_norm"):
                q, k = self._norm(attn.q_norm, q), self._norm(attn.k_norm, k)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            keys, values = past_key_values.update(k, v, index)
            out = F.scaled_dot_product_attention(
                q,
                keys,
                values,
                attn_mask=attention_mask,
                is_causal=attention_mask is None and width > 1,  # no mask: a fresh causal prefill
                scale=attn.scaling,
                enable_gqa=q.shape[1] != keys.shape[1],
            )
            out = out.transpose(1, 2).reshape(batch, width, -1)
            h = h + F.linear(out, attn.o_proj.weight, attn.o_proj.bias)
            x = self._norm(layer.post_attention_layernorm, h)
            gate = F.linear(x, mlp.gate_proj.weight, mlp.gate_proj.bias)
            up = F.linear(x, mlp.up_proj.weight, mlp.up_proj.bias)
            h = h + F.linear(F.silu(gate) * up, mlp.down_proj.weight, mlp.down_proj.bias)
        if isinstance(logits_to_keep, int):
            h = h[:, -logits_to_keep:] if logits_to_keep else h
        else:
            h = h[:, logits_to_keep]
        h = self._norm(self.base.norm, h)
        return _Logits(self.model.lm_head(h))
