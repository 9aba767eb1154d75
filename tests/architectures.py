"""Tiny random-weight models of the architectures MEMENTO checkpoints come in, for the
architecture matrix (main suite and tests/vllm): built from a config with the toy tokenizer (all
marker tokens included), 2 layers, and sharpened so that a wrongly visible or hidden key moves the
logits far beyond the test tolerance."""

from __future__ import annotations

from pathlib import Path

import torch

#: Sliding window of the windowed layers: far shorter than the test sequences, so it bites.
WINDOW = 6

#: name -> (model_type, config overrides). Two layers each; where the real model mixes sliding and
#: full layers (Qwen2 with max_window_layers, OLMo-3, Gemma 3) one of each.
ARCHITECTURES: dict[str, tuple[str, dict]] = {
    "qwen3": ("qwen3", {}),
    "qwen2-sliding": (
        "qwen2",
        {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1},
    ),
    "llama": ("llama", {}),
    "phi3": ("phi3", {"sliding_window": None}),
    "olmo3": ("olmo3", {"layer_types": ["sliding_attention", "full_attention"], "sliding_window": WINDOW}),
    "mistral-sliding": ("mistral", {"sliding_window": WINDOW}),
    "gemma3": (
        "gemma3_text",
        {
            "layer_types": ["sliding_attention", "full_attention"],
            "sliding_window": WINDOW,
            "query_pre_attn_scalar": 16,
        },
    ),
}


def build(name: str, tokenizer, seed: int = 0, **overrides):
    """The tiny model `name` (fp32, eval, sdpa) sized to `tokenizer`; seeded without touching the
    global RNG."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, extra = ARCHITECTURES[name]
    values = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        attn_implementation="sdpa",
    )
    config = AutoConfig.for_model(model_type, **{**values, **extra, **overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config).float().eval()
        zero_centred = model_type.startswith("gemma")  # Gemma's RMSNorm scales by (1 + weight)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if pname.endswith("bias"):  # zero at init (Qwen2 q/k/v): make them count
                    p.normal_(0.0, 0.5)
                elif p.dim() == 1:  # norm weights: sharper attention
                    p.add_(3.0) if zero_centred else p.mul_(4.0)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def save(name: str, tokenizer, directory: Path, seed: int = 0, **overrides) -> Path:
    """`build` and save model + tokenizer, loadable with the Auto classes (and by vLLM)."""
    model = build(name, tokenizer, seed, **overrides)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(directory)
    model.save_pretrained(directory)
    return directory
