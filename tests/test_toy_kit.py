import random

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from memento.format import MARKERS, Block, MementoTrace
from memento.tokens import ASSISTANT, IM_END, IM_START
from memento.toy import build_tiny_model, build_tokenizer

SINGLE_TOKENS = (
    *MARKERS,
    IM_START,
    IM_END,
    "<think>",
    "</think>",
    "<|endoftext|>",
    ASSISTANT,
    "user",
    "system",
)


def _random_text(rng: random.Random) -> str:
    pieces = []
    for _ in range(rng.randint(1, 12)):
        kind = rng.random()
        if kind < 0.25:
            pieces.append(rng.choice(SINGLE_TOKENS))
        elif kind < 0.5:
            pieces.append(" ".join(str(rng.randint(0, 10**6)) for _ in range(3)))
        else:
            # any code point outside the surrogate range, plus whitespace runs
            pieces.append(
                "".join(
                    chr(
                        rng.choice(
                            [rng.randint(32, 126), rng.randint(0xA0, 0xD7FF), rng.randint(0xE000, 0x10FFFF)]
                        )
                    )
                    if rng.random() < 0.8
                    else rng.choice([" ", "  ", "\n", "\t", "\r\n"])
                    for _ in range(rng.randint(0, 20))
                )
            )
    return "".join(pieces)


def test_round_trip_is_exact(toy_tokenizer):
    rng = random.Random(0)
    for _ in range(300):
        text = _random_text(rng)
        ids = toy_tokenizer.encode(text, add_special_tokens=False)
        assert toy_tokenizer.decode(ids) == text


def test_round_trip_of_a_rendered_trace(toy_tokenizer):
    trace = MementoTrace("What is 2+2?", (Block("2 + 2 = 4", "sum is 4"), Block("check: 4", "ok")), "4")
    text = trace.render()
    assert toy_tokenizer.decode(toy_tokenizer.encode(text, add_special_tokens=False)) == text


def test_special_and_role_tokens_are_single_ids(toy_tokenizer):
    for text in SINGLE_TOKENS:
        ids = toy_tokenizer.encode(text, add_special_tokens=False)
        assert len(ids) == 1, (text, ids)
    # markers stay whole inside running text
    ids = toy_tokenizer.encode("x" + MARKERS[0] + "y", add_special_tokens=False)
    assert toy_tokenizer.convert_tokens_to_ids(MARKERS[0]) in ids


def test_digits_are_split(toy_tokenizer):
    ids = toy_tokenizer.encode("12345", add_special_tokens=False)
    assert len(ids) == 5


def test_eos_pad_and_no_bos(toy_tokenizer):
    assert toy_tokenizer.eos_token == "<|endoftext|>"
    assert toy_tokenizer.pad_token_id == toy_tokenizer.eos_token_id
    assert toy_tokenizer.encode("hi") == toy_tokenizer.encode("hi", add_special_tokens=False)


def test_markers_fixture(markers, toy_tokenizer):
    assert markers.im_start == toy_tokenizer.convert_tokens_to_ids(IM_START)
    assert markers.assistant is not None
    assert len(set(markers.block_markers)) == 4


def test_chat_template(toy_tokenizer):
    prompt = toy_tokenizer.apply_chat_template(
        [{"role": "user", "content": "U"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
    ids = toy_tokenizer.encode(prompt, add_special_tokens=False)
    assert ids[-3:-1] == [
        toy_tokenizer.convert_tokens_to_ids(IM_START),
        toy_tokenizer.convert_tokens_to_ids(ASSISTANT),
    ]


def test_tokenizer_is_deterministic(toy_tokenizer):
    again = build_tokenizer()
    assert again.get_vocab() == toy_tokenizer.get_vocab()
    assert again.backend_tokenizer.to_str() == toy_tokenizer.backend_tokenizer.to_str()


def test_custom_corpus_and_no_markers():
    tok = build_tokenizer(["alpha beta gamma 123"] * 10, vocab_size=300, with_markers=False)
    assert MARKERS[0] not in tok.get_vocab()
    assert len(tok.encode(ASSISTANT, add_special_tokens=False)) == 1
    text = "alpha γ 42 " + MARKERS[0]
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_tiny_model_shape_and_seed(toy_tokenizer):
    model = build_tiny_model(toy_tokenizer, layers=2, hidden=64, heads=4, kv_heads=2, intermediate=96)
    cfg = model.config
    assert cfg.vocab_size == len(toy_tokenizer)
    assert cfg.head_dim == 16 and cfg.num_key_value_heads == 2 and cfg.num_hidden_layers == 2
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.dtype == torch.float32
    same = build_tiny_model(toy_tokenizer, layers=2, hidden=64, heads=4, kv_heads=2, intermediate=96)
    other = build_tiny_model(toy_tokenizer, layers=2, hidden=64, heads=4, kv_heads=2, intermediate=96, seed=1)
    assert torch.equal(model.model.embed_tokens.weight, same.model.embed_tokens.weight)
    assert not torch.equal(model.model.embed_tokens.weight, other.model.embed_tokens.weight)


def test_saved_checkpoint_loads_offline(toy_model_dir, toy_tokenizer, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = AutoTokenizer.from_pretrained(toy_model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(toy_model_dir, local_files_only=True)
    text = "<|im_start|>user\n12+30=?<|im_end|>\n<|im_start|>assistant\n<think>\n" + "".join(MARKERS)
    ids = tok.encode(text, add_special_tokens=False)
    assert ids == toy_tokenizer.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert tok.chat_template == toy_tokenizer.chat_template
    assert tok.eos_token_id == toy_tokenizer.eos_token_id
    # a chat turn ends at <|im_end|> for every server, including those that stop only on these ids
    assert set(model.generation_config.eos_token_id) == {tok.eos_token_id, tok.convert_tokens_to_ids(IM_END)}
    assert type(model).__name__ == "Qwen3ForCausalLM"
    assert model.config.tie_word_embeddings
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), len(tok))
    assert torch.isfinite(logits).all()
