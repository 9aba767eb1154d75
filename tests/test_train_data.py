"""Traces -> tokens: prompt labels masked, loss on everything the assistant writes, Control format,
over-long samples, bad dataset lines, markers added to a tokenizer that lacks them."""

from __future__ import annotations

import pytest
import torch

from memento.format import MARKERS
from memento.tokens import IM_END, MarkerIds
from memento.toy import build_tiny_model, build_tokenizer, save_toy_model
from memento.train import SFTConfig, load_samples, tokenize_trace, tokenize_traces, train
from memento.train.data import IGNORE_INDEX
from memento.train.sft import prepare_model_and_tokenizer
from train_traces import count_trace, make_traces, write_jsonl


def test_labels_cover_exactly_the_assistant_turn(toy_tokenizer, markers):
    trace = count_trace(3, 8)
    sample = tokenize_trace(trace, toy_tokenizer)
    header = toy_tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
    first = next(i for i, label in enumerate(sample.labels) if label != IGNORE_INDEX)
    assert sample.input_ids[first - len(header) : first] == header  # prompt ends with the header
    assert all(label == IGNORE_INDEX for label in sample.labels[:first])
    assert sample.labels[first:] == sample.input_ids[first:]
    assert toy_tokenizer.decode(sample.input_ids[first:]) == trace.render() + IM_END
    assert sample.input_ids[-1] == toy_tokenizer.convert_tokens_to_ids(IM_END)
    for marker_id in markers.block_markers:  # markers are single tokens and trained on
        assert marker_id in sample.labels


def test_system_prompt_goes_into_the_prompt(toy_tokenizer):
    sample = tokenize_trace(count_trace(1, 3), toy_tokenizer, system_prompt="Be brief.")
    text = toy_tokenizer.decode(sample.input_ids)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert "Be brief." not in toy_tokenizer.decode([t for t in sample.labels if t != IGNORE_INDEX])


def test_control_format_has_no_markers(toy_tokenizer, markers):
    sample = tokenize_trace(count_trace(1, 9), toy_tokenizer, fmt="control")
    assert not set(markers.block_markers) & set(sample.input_ids)
    text = toy_tokenizer.decode(sample.input_ids)
    assert not any(m in text for m in MARKERS)
    assert "1 2 3" in text and "at 3" not in text  # the reasoning stays, the mementos go


def test_overlong_truncate_and_drop_are_counted(toy_tokenizer):
    traces = [count_trace(1, 3), count_trace(1, 40, per_block=2)]
    long_len = len(tokenize_trace(traces[1], toy_tokenizer))
    max_length = long_len - 10
    kept, stats = tokenize_traces(traces, toy_tokenizer, max_length=max_length, overlong="truncate")
    assert stats.truncated == 1 and stats.dropped == 0 and len(kept) == 2
    assert max(len(s) for s in kept) == max_length
    kept, stats = tokenize_traces(traces, toy_tokenizer, max_length=max_length, overlong="drop")
    assert stats.dropped == 1 and stats.truncated == 0 and len(kept) == 1
    assert "dropped 1" in stats.summary()
    with pytest.raises(ValueError, match="no training samples left"):
        tokenize_traces(traces, toy_tokenizer, max_length=5, overlong="drop")


def test_bad_line_names_file_and_line_before_training(tmp_path, toy_tokenizer):
    path = write_jsonl(tmp_path / "data.jsonl", make_traces(3))
    with path.open("a") as fh:
        fh.write('{"problem": "p", "blocks": [{"reasoning": 1}]}\n')
    with pytest.raises(ValueError, match=r"data\.jsonl:4: blocks\[0\]"):
        load_samples(path, toy_tokenizer)
    out = tmp_path / "out"
    cfg = SFTConfig(model=str(tmp_path / "no-model-needed"), data=str(path), output_dir=str(out))
    with pytest.raises(ValueError, match=r"data\.jsonl:4"):
        train(cfg)  # fails on the data before even looking for the model
    assert not out.exists()


def test_markers_added_and_initialised_when_missing(tmp_path):
    tokenizer = build_tokenizer(with_markers=False)
    save_toy_model(tmp_path / "base", tokenizer, build_tiny_model(tokenizer, layers=1))
    model, tok, added = prepare_model_and_tokenizer(str(tmp_path / "base"))
    assert added
    ids = MarkerIds.from_tokenizer(tok)
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] >= len(tok) > max(ids.block_markers)
    assert torch.isfinite(emb[list(ids.block_markers)]).all()
    _, _, added_again = prepare_model_and_tokenizer(str(tmp_path / "base"), fmt="control")
    assert not added_again  # the Control row keeps the base vocabulary


def test_config_rejects_unknown_keys_and_bad_combinations(tmp_path):
    base = {"model": "m", "data": "d", "output_dir": "o"}
    with pytest.raises(ValueError, match="unknown training option"):
        SFTConfig.from_dict({**base, "learning_rate": 1e-4})
    with pytest.raises(ValueError, match="unknown block-masking option"):
        SFTConfig.from_dict({**base, "masking": {"keep": 0}})
    with pytest.raises(ValueError, match="--stage full"):
        SFTConfig.from_dict({**base, "stage": "memento", "format": "control"})
    with pytest.raises(ValueError, match="missing required"):
        SFTConfig.from_dict({"model": "m"})
    cfg = SFTConfig.from_dict({**base, "max-steps": 5, "masking": {"mask_delimiters": True}})
    assert cfg.max_steps == 5 and cfg.masking.mask_delimiters


def test_example_config_file_is_valid():
    from pathlib import Path

    from memento.train import load_config_file

    path = Path(__file__).resolve().parents[1] / "examples" / "train-stage2.yaml"
    cfg = SFTConfig.from_dict(load_config_file(path))
    assert cfg.stage == "memento" and cfg.masking.keep_last_n_blocks == 0 and cfg.gradient_checkpointing
