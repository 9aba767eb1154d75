"""Restart semantics beyond the engine: the fair variant (`restart_kv_only`: evict what memento mode
evicts, recompute every kept token that saw the block), restart as one dense pattern over virtual
entries (`virtual_sequence`), and Stage-2 training under restart semantics."""

from __future__ import annotations

import random

import pytest
import torch

from engine_helpers import (
    LogitsRecorder,
    block_stream,
    dense_logits,
    header,
    one_thread,  # noqa: F401 (fixture)
    restart_reference_logits,
    sharp_model,
    text_ids,
)
from memento.engine import Engine
from memento.masking import (
    BlockMaskingConfig,
    Eviction,
    attention_mask,
    config_for_mode,
    evictions,
    virtual_sequence,
)
from memento.tokens import MarkerIds
from memento.train.collator import MementoCollator
from memento.train.data import IGNORE_INDEX

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-4
M = MarkerIds(block_start=10, block_end=11, summary_start=12, summary_end=13, im_start=1, assistant=3)
# spec §8 header (positions 0-7, gate opens at 6) then g1 with a gap token between BE and SS in block 0
HEADER = [1, 2, 8, 4, 5, 1, 3, 5]
G1_GAP = [6, 10, 30, 31, 11, 5, 12, 32, 13, 10, 33, 11, 12, 34, 13, 7, 35]
# positions: <think>8 BS9 a10 b11 BE12 gap13 SS14 s15 SE16 BS17 c18 BE19 SS20 t21 SE22 </think>23 X24

FAIR = BlockMaskingConfig(restart_mode=True, restart_kv_only=True)
CLASSIC = BlockMaskingConfig(restart_mode=True)


def test_fair_restart_evicts_what_memento_mode_evicts_and_recomputes_from_the_span_end():
    ids = HEADER + G1_GAP
    memento = evictions(ids, M, BlockMaskingConfig())
    fair = evictions(ids, M, FAIR)
    assert [(e.trigger, e.start, e.end) for e in fair] == [(e.trigger, e.start, e.end) for e in memento]
    assert fair == [Eviction(16, 10, 12, recompute_from=12), Eviction(22, 18, 19, recompute_from=19)]
    # today's variant: delimiters go, the memento is recomputed from SS, the gap (13) keeps its old KV
    assert evictions(ids, M, CLASSIC) == [Eviction(16, 9, 13, 14), Eviction(22, 17, 20, 20)]
    # with evicted delimiters the fair span is the delimited one, recomputed from the token after BE
    md = evictions(ids, M, BlockMaskingConfig(restart_mode=True, restart_kv_only=True, mask_delimiters=True))
    assert md[0] == Eviction(16, 9, 13, recompute_from=13)


def test_config_for_mode_keeps_the_fair_flag_only_in_restart():
    assert config_for_mode("restart", BlockMaskingConfig(restart_kv_only=True)) == FAIR
    assert not config_for_mode("full", FAIR).restart_kv_only
    with pytest.raises(ValueError, match="restart"):
        config_for_mode("memento", BlockMaskingConfig(restart_kv_only=True))
    with pytest.raises(ValueError, match="true or false"):
        BlockMaskingConfig(restart_kv_only="yes")
    assert BlockMaskingConfig.from_dict({"restart_kv_only": True}).restart_kv_only


def test_virtual_sequence_without_restart_is_the_stage2_mask():
    ids = HEADER + G1_GAP
    v = virtual_sequence(ids, M, BlockMaskingConfig())
    assert v.positions == list(range(len(ids))) == v.first == v.last
    assert torch.equal(v.visible, attention_mask(ids, M))


def test_fair_restart_copies_never_see_a_block_and_later_tokens_read_them():
    ids = HEADER + G1_GAP
    v = virtual_sequence(ids, M, FAIR)
    evicted = {10, 11, 18}
    for p in range(len(ids)):
        if v.first[p] != v.last[p]:  # recomputed
            copy = v.last[p]
            seen = {v.positions[k] for k in range(len(v)) if v.visible[copy, k]}
            assert not seen & evicted
    assert sorted(p for p in range(len(ids)) if v.first[p] != v.last[p]) == [12, 13, 14, 15, 19, 20, 21]
    later = v.first[23]  # </think>
    assert v.visible[later, v.last[15]] and not v.visible[later, v.first[15]]


@pytest.fixture(scope="module")
def model(toy_tokenizer):
    return sharp_model(toy_tokenizer, seed=3)


def _pairs(toy_tokenizer, markers, count, seed):
    words = text_ids(toy_tokenizer, markers)
    rng = random.Random(seed)
    return [
        (header(toy_tokenizer, f"q{i}") + block_stream(markers, words, rng, 1, tail=1),
         block_stream(markers, words, rng, rng.randint(2, 4)))
        for i in range(count)
    ]  # fmt: skip


@torch.no_grad()
def _virtual_logits(model, ids, markers, config):
    v = virtual_sequence(ids, markers, config)
    out = model(
        input_ids=torch.tensor([[ids[p] for p in v.positions]]),
        position_ids=torch.tensor([v.positions]),
        attention_mask=v.visible[None, None],
    )
    return out.logits[0][torch.tensor(v.first)].float()


@pytest.mark.parametrize("config", [FAIR, CLASSIC, BlockMaskingConfig(restart_mode=True, restart_kv_only=True,
                                                                       keep_last_n_blocks=1)],
                         ids=["fair", "classic", "fair-keep1"])  # fmt: skip
def test_engine_restart_matches_the_virtual_sequence_and_the_reference(model, toy_tokenizer, markers, config):
    """The engine (physical eviction + rewind) = one dense forward over `virtual_sequence` = the
    independent reference of tests/engine_helpers.py, for both restart variants."""
    pairs = _pairs(toy_tokenizer, markers, 3, seed=8)
    engine = Engine(model, toy_tokenizer, mode="restart", masking=config, max_batch_size=4)
    recorder = LogitsRecorder()
    engine.logits_hook = recorder
    outs = engine.replay([p for p, _ in pairs], [o for _, o in pairs])
    worst = 0.0
    for i, ((prompt, out), res) in enumerate(zip(pairs, outs, strict=True)):
        ids = prompt + out
        assert res.evictions == evictions(ids, markers, config)
        assert all(e.recompute_from is not None for e in res.evictions)
        virtual = _virtual_logits(model, ids, markers, config)
        reference = restart_reference_logits(model, ids, markers, config)
        assert (virtual - reference).abs().max() <= TOL
        for p, row in recorder.logits[(i, 0)].items():
            worst = max(worst, (row - virtual[p]).abs().max().item())
    assert worst <= TOL, worst


def test_fair_restart_changes_only_what_follows_the_first_memento(model, toy_tokenizer, markers):
    """Same text, only the KV channel differs: identical logits until the first block's memento is
    recomputed, different after (the check above is not vacuous)."""
    prompt, out = _pairs(toy_tokenizer, markers, 1, seed=9)[0]
    ids = prompt + out
    fair = _virtual_logits(model, ids, markers, FAIR)
    masked = dense_logits(model, ids, markers, BlockMaskingConfig())
    first = evictions(ids, markers, BlockMaskingConfig())[0].trigger
    assert (fair[:first] - masked[:first]).abs().max() <= TOL
    assert (fair[first:] - masked[first:]).abs().max() > 1e-2


@pytest.mark.parametrize("config", [FAIR, CLASSIC], ids=["fair", "classic"])
def test_restart_training_loss_is_the_nll_of_restart_inference(model, toy_tokenizer, markers, config):
    """A Stage-2 batch under restart semantics trains exactly on what restart inference samples
    from: the model's loss on the collated batch equals the NLL of the labelled tokens under the
    reference restart logits (padding rows included)."""
    pairs = _pairs(toy_tokenizer, markers, 3, seed=10)
    feats = []
    for prompt, out in pairs:
        feats.append({"input_ids": prompt + out, "labels": [IGNORE_INDEX] * len(prompt) + out})
    collator = MementoCollator(pad_token_id=0, stage="memento", markers=markers, masking=config)
    batch = collator(feats)
    assert (
        batch["attention_mask"].shape[-1]
        == batch["input_ids"].shape[1]
        > max(len(f["input_ids"]) for f in feats)
    )
    with torch.no_grad():
        loss = model(**batch).loss
    nll, count = 0.0, 0
    for f in feats:
        ref = restart_reference_logits(model, f["input_ids"], markers, config)
        logp = torch.log_softmax(ref, -1)
        for p in range(len(f["input_ids"]) - 1):
            if f["labels"][p + 1] != IGNORE_INDEX:
                nll -= logp[p, f["labels"][p + 1]].item()
                count += 1
    assert abs(loss.item() - nll / count) <= 1e-4
    with pytest.raises(ValueError, match="dense"):
        MementoCollator(
            pad_token_id=0, stage="memento", markers=markers, masking=config, mask_format="kill_times"
        )


@pytest.mark.parametrize("fair", [False, True], ids=["classic", "fair"])
def test_two_evictions_at_one_trigger_recompute_once(model, toy_tokenizer, markers, fair):
    """Evictions sharing a trigger (the next `<|block_start|>` flushes two pending blocks) apply
    together, then one recompute from the earliest point (docs/masking.md, issue 12 bug 5): the
    virtual sequence agrees with the engine and the reference on that definition."""
    words = text_ids(toy_tokenizer, markers)
    rng = random.Random(6)
    m = markers
    w = lambda k: rng.choices(words, k=k)  # noqa: E731
    out = [m.block_start, *w(3), m.block_end, m.block_start, *w(3), m.block_end]
    out += [m.summary_start, *w(2), m.summary_end, m.summary_start, *w(2), m.summary_end, *w(1)]
    out += [m.block_start, *w(2), m.block_end, m.summary_start, *w(1), m.summary_end, *w(3)]
    prompt = header(toy_tokenizer, "two at once")
    config = BlockMaskingConfig(restart_mode=True, restart_kv_only=fair, keep_last_block_for_answer=True)
    ids = prompt + out
    evs = evictions(ids, markers, config)
    assert len(evs) >= 2 and evs[0].trigger == evs[1].trigger
    virtual = _virtual_logits(model, ids, markers, config)
    assert (virtual - restart_reference_logits(model, ids, markers, config)).abs().max() <= TOL
    engine = Engine(model, toy_tokenizer, mode="restart", masking=config)
    recorder = LogitsRecorder()
    engine.logits_hook = recorder
    engine.replay([prompt], [out])
    worst = max((row - virtual[p]).abs().max().item() for p, row in recorder.logits[(0, 0)].items())
    assert worst <= TOL
