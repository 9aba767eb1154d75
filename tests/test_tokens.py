import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from memento.format import BLOCK_END, BLOCK_START, MARKERS, SUMMARY_END, SUMMARY_START, THINK_END, THINK_START
from memento.tokens import (
    CHATML_TEMPLATE,
    RELATED_WORDS,
    MarkerIds,
    add_memento_tokens,
    ensure_chat_template,
)
from memento.toy import build_tiny_model, build_tokenizer

NEW = (*MARKERS, THINK_START, THINK_END)


@pytest.fixture(scope="module")
def bare_tokenizer_factory():
    """Fresh toy tokenizers without the block markers (add_memento_tokens mutates them)."""
    return lambda: build_tokenizer(with_markers=False)


def _untied_model(tokenizer, extra_rows: int = 0):
    config = Qwen3Config(
        vocab_size=len(tokenizer) + extra_rows,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return Qwen3ForCausalLM(config)


def _expected_mean(tokenizer, weight, token, old_rows):
    """Mean over every sub-token of each related word (bare and space-prefixed), computed here
    independently of the implementation."""
    ids = set()
    for word in RELATED_WORDS[token]:
        for variant in (word, " " + word):
            ids.update(i for i in tokenizer.encode(variant, add_special_tokens=False) if i < old_rows)
    assert ids, token
    return weight[sorted(ids)].mean(0)


def test_related_words_cover_every_new_token():
    assert set(RELATED_WORDS) == set(NEW)
    assert RELATED_WORDS[BLOCK_START][:2] == ("block", "start")


def test_adds_markers_with_mean_init_tied(bare_tokenizer_factory):
    tok = bare_tokenizer_factory()
    model = build_tiny_model(tok, layers=1, hidden=32, heads=2, kv_heads=1, intermediate=64)
    old_rows = len(tok)
    before = model.model.embed_tokens.weight.detach().clone()
    with pytest.raises(ValueError):
        MarkerIds.from_tokenizer(tok)

    ids = add_memento_tokens(tok, model, noise_std=0.0)

    assert len(tok) == old_rows + 4  # think tokens were already there
    assert ids == MarkerIds.from_tokenizer(tok)
    for text in MARKERS:
        assert len(tok.encode(text, add_special_tokens=False)) == 1
    text = "a" + BLOCK_START + "b 12" + SUMMARY_END
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    emb = model.model.embed_tokens.weight
    assert emb.shape[0] == len(tok) and model.config.vocab_size == len(tok)
    assert model.lm_head.weight is emb
    assert torch.equal(emb[:old_rows], before)  # existing rows untouched
    for token in MARKERS:
        row = emb[tok.convert_tokens_to_ids(token)]
        torch.testing.assert_close(row, _expected_mean(tok, before, token, old_rows))
    # the four markers get four different rows
    rows = emb[list(ids.block_markers)]
    assert torch.cdist(rows, rows).fill_diagonal_(1.0).min() > 0


def test_untied_output_embeddings_also_initialised(bare_tokenizer_factory):
    tok = bare_tokenizer_factory()
    model = _untied_model(tok)
    old_rows = len(tok)
    inp, out = model.model.embed_tokens.weight.detach().clone(), model.lm_head.weight.detach().clone()
    add_memento_tokens(tok, model, noise_std=0.0)
    assert model.lm_head.weight.shape[0] == len(tok)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    for token in MARKERS:
        i = tok.convert_tokens_to_ids(token)
        torch.testing.assert_close(
            model.model.embed_tokens.weight[i], _expected_mean(tok, inp, token, old_rows)
        )
        torch.testing.assert_close(model.lm_head.weight[i], _expected_mean(tok, out, token, old_rows))


def test_noise_is_small_and_seeded(bare_tokenizer_factory):
    rows = []
    for seed in (0, 0, 1):
        tok = bare_tokenizer_factory()
        model = build_tiny_model(tok, layers=1, hidden=64, heads=2, kv_heads=1, intermediate=64)
        before = model.model.embed_tokens.weight.detach().clone()
        add_memento_tokens(tok, model, noise_std=0.01, seed=seed)
        i = tok.convert_tokens_to_ids(BLOCK_END)
        row = model.model.embed_tokens.weight[i].detach().clone()
        noise = row - _expected_mean(tok, before, BLOCK_END, len(before))
        assert 0.002 < noise.std() < 0.03
        rows.append(row)
    assert torch.equal(rows[0], rows[1])
    assert not torch.equal(rows[0], rows[2])


def test_idempotent(bare_tokenizer_factory):
    tok = bare_tokenizer_factory()
    model = _untied_model(tok)
    first = add_memento_tokens(tok, model)
    size = len(tok)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    second = add_memento_tokens(tok, model)
    assert second == first and len(tok) == size
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_toy_tokenizer_already_complete(toy_tokenizer):
    model = build_tiny_model(toy_tokenizer, layers=1, hidden=32, heads=2, kv_heads=1, intermediate=64)
    before = model.model.embed_tokens.weight.detach().clone()
    size = len(toy_tokenizer)
    add_memento_tokens(toy_tokenizer, model)
    assert len(toy_tokenizer) == size
    assert torch.equal(model.model.embed_tokens.weight, before)


def test_padded_embedding_matrix_is_not_shrunk(bare_tokenizer_factory):
    """Checkpoints like Qwen's carry more embedding rows than tokens; new ids land in spare rows."""
    tok = bare_tokenizer_factory()
    model = _untied_model(tok, extra_rows=16)
    old_rows = len(tok)
    before = model.model.embed_tokens.weight.detach().clone()
    add_memento_tokens(tok, model, noise_std=0.0)
    assert model.model.embed_tokens.weight.shape[0] == old_rows + 16
    i = tok.convert_tokens_to_ids(SUMMARY_START)
    assert i < old_rows + 16
    torch.testing.assert_close(
        model.model.embed_tokens.weight[i], _expected_mean(tok, before, SUMMARY_START, old_rows)
    )


def test_word_level_tokenizer_think_tokens_and_fallback():
    """Words that do not encode are skipped; with none left the row is the mean of all rows;
    missing <think>/</think> are added too."""
    vocab = {"[UNK]": 0, "block": 1, "start": 2, "end": 3, "x": 4, "y": 5}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    config = Qwen3Config(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config)
    before = model.model.embed_tokens.weight.detach().clone()
    add_memento_tokens(tok, model, noise_std=0.0)
    assert len(tok) == len(vocab) + 6
    emb = model.model.embed_tokens.weight
    for token in NEW:
        assert len(tok.encode(token, add_special_tokens=False)) == 1
    torch.testing.assert_close(emb[tok.convert_tokens_to_ids(BLOCK_START)], before[[1, 2]].mean(0))
    torch.testing.assert_close(emb[tok.convert_tokens_to_ids(BLOCK_END)], before[[1, 3]].mean(0))
    torch.testing.assert_close(emb[tok.convert_tokens_to_ids(SUMMARY_START)], before.mean(0))
    torch.testing.assert_close(emb[tok.convert_tokens_to_ids(THINK_START)], before[[2]].mean(0))


def test_tokenizer_only():
    tok = build_tokenizer(with_markers=False)
    ids = add_memento_tokens(tok)
    assert ids.assistant == tok.convert_tokens_to_ids("assistant")
    assert ids.im_start == tok.convert_tokens_to_ids("<|im_start|>")


def test_chatml_template_renders_spec_case():
    tok = build_tokenizer()
    tok.chat_template = None
    assert ensure_chat_template(tok) is True
    assert tok.chat_template == CHATML_TEMPLATE
    assert ensure_chat_template(tok) is False  # already has one
    msgs = [{"role": "user", "content": "U"}]
    assert (
        tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        == "<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tok.apply_chat_template(msgs, tokenize=False) == "<|im_start|>user\nU<|im_end|>\n"
    # no system prompt is injected, but one the caller passes is rendered
    with_sys = [{"role": "system", "content": "S"}, *msgs, {"role": "assistant", "content": "A"}]
    assert tok.apply_chat_template(with_sys, tokenize=False) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"
    )


def test_ensure_chat_template_needs_chatml_tokens():
    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    assert ensure_chat_template(tok) is False
    assert not tok.chat_template
