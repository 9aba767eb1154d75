"""The architecture matrix: every model family MEMENTO checkpoints come in (Qwen3, Qwen2 with a
sliding/full mix, Llama, Phi-3, OLMo-3 with its sliding/full mix, Mistral and Gemma 3 with sliding
windows), tiny and random, through the engine (modes full, memento keep 0 / keep 1 /
mask_delimiters, restart) and Stage-2 training:

* mode full equals the model's own forward (its own causal and sliding-window masks), so the
  engine's window rule is the model's;
* physical eviction equals one dense forward with the Stage-2 mask per layer window, routed by the
  model itself (restart: its virtual-sequence definition), ≤1e-4 in fp32;
* the Stage-2 training loss (collator + memento's attention) equals the engine's replay NLL.

The vLLM plugin's column of the matrix is tests/vllm/test_vllm_architectures.py."""

from __future__ import annotations

import random

import pytest
import torch

from architectures import ARCHITECTURES, build
from engine_helpers import (
    LogitsRecorder,
    block_stream,
    dense_logits,
    header,
    one_thread,  # noqa: F401 (fixture)
    restart_reference_logits,
    routed_mask,
    text_ids,
)
from memento.engine import Engine
from memento.hf import UnsupportedModel, check_model, layer_windows, register_attention
from memento.masking import BlockMaskingConfig, evictions
from memento.train import MementoCollator
from memento.train.data import IGNORE_INDEX, Sample

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-4
NAMES = list(ARCHITECTURES)


@pytest.fixture(scope="module")
def models(toy_tokenizer):
    return {}


def _model(models, name, tokenizer):
    if name not in models:
        models[name] = build(name, tokenizer, seed=NAMES.index(name))
    return models[name]


@pytest.fixture(scope="module")
def pairs(toy_tokenizer, markers):
    """Two (prompt, output) streams; the second prompt already holds a completed block."""
    rng = random.Random(17)
    words = text_ids(toy_tokenizer, markers)
    return [
        (header(toy_tokenizer, "first"), block_stream(markers, words, rng, 3)),
        (
            header(toy_tokenizer, "second") + block_stream(markers, words, rng, 1, tail=1),
            block_stream(markers, words, rng, 2),
        ),
    ]


def _replay_logits(engine, pairs):
    recorder = LogitsRecorder()
    engine.logits_hook = recorder
    outs = engine.replay([p for p, _ in pairs], [o for _, o in pairs])
    return outs, recorder.logits


def _worst(got: dict[int, torch.Tensor], ref: torch.Tensor) -> float:
    return max((row - ref[p]).abs().max().item() for p, row in got.items())


@pytest.mark.parametrize("name", NAMES)
def test_full_mode_equals_the_models_own_forward(models, toy_tokenizer, markers, pairs, name):
    """No eviction: the engine (direct forward where supported, and the HF forward) gives the
    model's own logits, computed with the model's own causal and sliding-window masks."""
    model = _model(models, name, toy_tokenizer)
    paths = [True, False]
    for direct in paths:
        engine = Engine(model, toy_tokenizer, mode="full", direct_forward=direct, prefill_chunk_tokens=8)
        if direct and engine.runner.direct is None:
            continue
        _, logits = _replay_logits(engine, pairs)
        for i, (prompt, output) in enumerate(pairs):
            ids = prompt + output
            with torch.no_grad():
                own = model(input_ids=torch.tensor([ids])).logits[0].float()
            assert _worst(logits[(i, 0)], own) <= TOL, (name, direct)
    if any(w is not None for w in layer_windows(model.config)):  # the windows really bite here
        ids = pairs[0][0] + pairs[0][1]
        causal = torch.ones(len(ids), len(ids), dtype=torch.bool).tril()[None, None]
        with torch.no_grad():
            own = model(input_ids=torch.tensor([ids])).logits[0]
            unwindowed = model(input_ids=torch.tensor([ids]), attention_mask=causal).logits[0]
        assert (own - unwindowed).abs().max() > 1e-2


CONFIGS = {
    "keep0": ("memento", BlockMaskingConfig()),
    "keep1": ("memento", BlockMaskingConfig(keep_last_n_blocks=1)),
    "mask_delimiters": ("memento", BlockMaskingConfig(mask_delimiters=True)),
    "restart": ("restart", BlockMaskingConfig()),
}


@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("name", NAMES)
def test_eviction_equals_dense_stage2(models, toy_tokenizer, markers, pairs, name, config_name):
    """Batched rows evicting at different steps, a prompt with a resident block, chunked prefill
    and (keep 0) preemption under a KV budget: every logit equals the dense reference."""
    model = _model(models, name, toy_tokenizer)
    mode, masking = CONFIGS[config_name]
    budget = 50 if config_name == "keep0" else None
    engine = Engine(
        model, toy_tokenizer, mode=mode, masking=masking, prefill_chunk_tokens=9, kv_budget_tokens=budget
    )
    outs, logits = _replay_logits(engine, pairs)
    if budget is not None:
        assert engine.last_run["preemptions"] > 0
    reference = restart_reference_logits if mode == "restart" else dense_logits
    for i, ((prompt, output), out) in enumerate(zip(pairs, outs, strict=True)):
        ids = prompt + output
        assert out.evictions == evictions(ids, markers, engine.config) and out.evictions
        assert _worst(logits[(i, 0)], reference(model, ids, markers, engine.config)) <= TOL


@pytest.mark.parametrize("name", NAMES)
def test_stage2_training_loss_equals_engine_replay(models, toy_tokenizer, markers, pairs, name):
    """Training and inference cannot drift apart: the Stage-2 loss of a padded batch (collator
    masks per layer window, memento's attention as `memento train` sets it) equals the mean NLL of
    the same tokens replayed through the evicting engine."""
    model = _model(models, name, toy_tokenizer)
    samples = [Sample(p + o, [IGNORE_INDEX] * len(p) + o) for p, o in pairs]
    collator = MementoCollator(
        toy_tokenizer.pad_token_id, "memento", markers, layer_windows=layer_windows(model.config)
    )
    batch = collator(samples)
    assert ("memento_masks" in batch) == any(w is not None for w in layer_windows(model.config))
    saved = model.config._attn_implementation
    model.set_attn_implementation(register_attention())
    try:
        with torch.no_grad():
            loss = model(**batch).loss.item()
    finally:
        model.set_attn_implementation(saved)
    outs = Engine(model, toy_tokenizer).replay([p for p, _ in pairs], [o for _, o in pairs])
    logprobs = [lp for out in outs for lp in out.logprobs]
    assert abs(loss + sum(logprobs) / len(logprobs)) <= TOL


def test_training_reference_is_not_vacuous(models, toy_tokenizer, markers, pairs):
    """The per-window routing matters: one 4-D mask for every layer (review bug 2's pattern)
    gives a different loss on a model with a sliding/full mix."""
    model = _model(models, "olmo3", toy_tokenizer)
    ids = pairs[0][0] + pairs[0][1]
    right = dense_logits(model, ids, markers, BlockMaskingConfig())
    from memento.masking import attention_mask

    with torch.no_grad():
        wrong = model(
            input_ids=torch.tensor([ids]),
            position_ids=torch.arange(len(ids))[None],
            attention_mask=attention_mask(ids, markers)[None, None],
        ).logits[0]
    assert (right - wrong).abs().max() > 1e-2
    assert isinstance(routed_mask(model, lambda w: w), dict)


def test_hf_path_applies_sliding_windows(toy_tokenizer, markers, pairs):
    """Regression (review bug 2): a tiny Qwen2 with sliding_window=4, mode full, through the HF
    forward, differed from the model's own forward by 0.51 in logits; now it equals it."""
    model = build("qwen2-sliding", toy_tokenizer, sliding_window=4, max_window_layers=0)
    assert layer_windows(model.config) == (4, 4)
    engine = Engine(model, toy_tokenizer, mode="full", direct_forward=False)
    _, logits = _replay_logits(engine, pairs[:1])
    ids = pairs[0][0] + pairs[0][1]
    with torch.no_grad():
        own = model(input_ids=torch.tensor([ids])).logits[0]
    assert _worst(logits[(0, 0)], own) <= TOL


def test_unsupported_layer_types_are_refused_at_load(toy_tokenizer, tmp_path):
    """Linear-attention layers (Qwen3-Next) keep no per-token KV to evict: refused with the reason,
    from a loaded model and from a checkpoint directory before any weight is read."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(
        "qwen3_next",
        vocab_size=len(toy_tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        layer_types=["linear_attention", "full_attention"],
    )
    with pytest.raises(UnsupportedModel, match=r"linear_attention.*layers \[0\]"):
        check_model(config)
    (tmp_path / "model").mkdir()
    config.save_pretrained(tmp_path / "model")
    toy_tokenizer.save_pretrained(tmp_path / "model")
    with pytest.raises(UnsupportedModel, match="linear_attention"):
        Engine.from_pretrained(tmp_path / "model")
    gemma2 = AutoConfig.for_model("gemma2", num_hidden_layers=2, attn_logit_softcapping=50.0)
    with pytest.raises(UnsupportedModel, match="soft-capping"):
        check_model(gemma2)


def test_generate_refuses_unsupported_model_cleanly(toy_tokenizer, tmp_path):
    from transformers import AutoConfig
    from typer.testing import CliRunner

    from memento.cli import app

    config = AutoConfig.for_model("qwen3_next", num_hidden_layers=2, layer_types=["linear_attention"] * 2)
    config.save_pretrained(tmp_path)
    toy_tokenizer.save_pretrained(tmp_path)
    result = CliRunner().invoke(app, ["generate", "--model", str(tmp_path), "--prompt", "hi"])
    assert result.exit_code == 2 and "linear_attention" in result.stderr and "Traceback" not in result.output


def test_memento_train_runs_a_sliding_window_model(toy_tokenizer, tmp_path):
    """`memento train --stage memento` on OLMo-3 (sliding/full mix): the per-window masks travel
    through the HF Trainer; attention kernels that cannot take them are refused with the reason."""
    import math

    from architectures import save
    from memento.train import SFTConfig, train
    from train_traces import make_traces, write_jsonl

    model_dir = save("olmo3", toy_tokenizer, tmp_path / "model")
    data = write_jsonl(tmp_path / "traces.jsonl", make_traces(8, seed=3))
    common = dict(
        model=str(model_dir), data=str(data), stage="memento", batch_size=2, grad_accum=1, progress=False
    )
    result = train(SFTConfig(output_dir=str(tmp_path / "out"), max_steps=2, save_steps=100, **common))
    assert result.global_step == 2 and math.isfinite(result.final_loss) and result.attention == "sdpa"
    with pytest.raises(ValueError, match="sliding-window"):
        train(SFTConfig(output_dir=str(tmp_path / "eager"), max_steps=1, attention="eager", **common))
