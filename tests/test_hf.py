"""The transformers adapter (`memento.hf`): its import-time check, the one attention function
shared by the engine and training, and that nothing else in the package reaches into transformers."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from memento import hf
from memento.toy import build_tiny_model

SRC = Path(hf.__file__).resolve().parent

#: transformers submodules other code may import from: documented public utilities.
PUBLIC_SUBMODULES = {"transformers.utils", "transformers.trainer_utils"}


def test_check_passes_on_the_installed_release():
    assert hf.check()


def test_check_names_what_changed(monkeypatch):
    class OldCache:
        def __init__(self, config=None):
            pass

    monkeypatch.setattr(hf, "Cache", OldCache)
    with pytest.raises(hf.UnsupportedTransformers, match=r"Cache\(layers=\.\.\.\) is gone"):
        hf.check()


def test_only_the_adapter_touches_transformers_internals():
    """Private attributes, cache and masking internals, and non-public submodules appear in
    memento.hf only (the vLLM plugin runs in its own environment and checks its own hooks)."""
    private = re.compile(
        r"\._attn_implementation|cache_utils|masking_utils|integrations\.sdpa|\.layers\[|_hf_hook"
    )
    submodule = re.compile(r"(?:from|import) (transformers\.[\w.]+)")
    offenders = []
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC)
        if rel == Path("hf.py") or rel.parts[:2] == ("integrations", "vllm"):
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            bad = private.search(line)
            module = submodule.search(line)
            if bad or (module and module.group(1) not in PUBLIC_SUBMODULES):
                offenders.append(f"{rel}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_one_attention_function_serves_engine_and_training(toy_tokenizer):
    """Regression (review bug 7): the engine and training registered two different functions
    under one name, and whichever came last served both. There is now one function."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from memento.engine import Engine

    model = build_tiny_model(toy_tokenizer, layers=1, hidden=32, heads=2, kv_heads=1, intermediate=64)
    Engine(model, toy_tokenizer, direct_forward=False)  # the engine's HF path registers it
    name = hf.register_attention()  # what `memento train --stage memento` calls
    assert ALL_ATTENTION_FUNCTIONS[name] is hf.memento_sdpa


def test_attention_swap_is_scoped(toy_tokenizer):
    model = build_tiny_model(toy_tokenizer, layers=1, hidden=32, heads=2, kv_heads=1, intermediate=64)
    swap = hf.AttentionSwap(model)
    with swap.active():
        assert model.config._attn_implementation == hf.ATTENTION_NAME
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(RuntimeError), swap.active():
        raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"


def test_memento_sdpa_refuses_what_it_does_not_implement():
    q = k = v = torch.zeros(1, 2, 3, 4)
    module = torch.nn.Module()
    module.layer_idx = 0
    with pytest.raises(NotImplementedError, match="softcap"):
        hf.memento_sdpa(module, q, k, v, None, softcap=30.0)
    out, _ = hf.memento_sdpa(module, q, k, v, None, softcap=None, scaling=0.5)  # None = not used
    assert out.shape == (1, 3, 2, 4)


def test_memento_sdpa_matches_torch_sdpa_with_grouped_heads():
    """Grouped KV heads are broadcast, not copied; a boolean mask is applied as given."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 8, generator=gen)
    k = torch.randn(2, 2, 5, 8, generator=gen)
    v = torch.randn(2, 2, 5, 8, generator=gen)
    mask = torch.rand(2, 1, 5, 5, generator=gen) > 0.3
    mask |= torch.eye(5, dtype=torch.bool)
    out, _ = hf.memento_sdpa(torch.nn.Module(), q, k, v, mask, scaling=0.3)
    want = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=mask, scale=0.3
    )
    assert torch.allclose(out, want.transpose(1, 2), atol=1e-6)


def test_decoder_parts_only_for_plain_llama_family(toy_tokenizer):
    model = build_tiny_model(toy_tokenizer, layers=1, hidden=32, heads=2, kv_heads=1, intermediate=64)
    parts = hf.decoder_parts(model)
    assert parts is not None and len(parts.layers) == 1 and parts.layers[0].q_norm is not None
    handle = model.model.layers[0].mlp.register_forward_hook(lambda *a: None)
    assert hf.decoder_parts(model) is None  # a hook must run: keep the HF forward
    handle.remove()
