"""A tiny, fully local model kit: a byte-level BPE tokenizer trained on the spot and a small
standard Qwen3 model, so every part of memento can be exercised on CPU with no hub access."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from memento.format import MARKERS, THINK_END, THINK_START
from memento.tokens import ASSISTANT, CHATML_TEMPLATE, IM_END, IM_START

EOS = "<|endoftext|>"
ROLE_WORDS = (ASSISTANT, "user", "system")

# A small built-in corpus: enough English and arithmetic for BPE to learn useful merges.
DEFAULT_CORPUS: tuple[str, ...] = (
    "We solve the problem step by step. First we read the question carefully, then we write down "
    "what is known and what is asked. Each step should be short and checked before we move on.",
    "To add two numbers, line up their digits and add from the right, carrying when a column is "
    "ten or more. For example 47 + 38 = 85, because 7 + 8 = 15, we write 5 and carry 1.",
    "Multiplication is repeated addition: 6 * 7 = 42 and 12 * 12 = 144. Division undoes it, so "
    "144 / 12 = 12. Subtraction undoes addition: 100 - 58 = 42.",
    "Let x be the unknown. If 3x + 5 = 20 then 3x = 15 and x = 5. We check the answer by "
    "substituting it back: 3 * 5 + 5 = 20, which is true, so the answer is 5.",
    "A summary keeps only what matters: the values found so far, the equation that remains, and "
    "the next step. The block of reasoning before it can then be forgotten.",
    "The user asks a question and the assistant answers it. The system may give instructions. "
    "The assistant thinks first, writes a brief recap of each block, and then gives the final answer.",
    "Count the items: there are 3 red balls, 4 blue balls and 5 green balls, so 3 + 4 + 5 = 12 "
    "balls in total. The probability of a red ball is 3 / 12 = 1 / 4.",
    "Compute the sum of the list 2, 4, 6, 8, 10. Running total: 2, 6, 12, 20, 30. The answer is 30. "
    "The remainder of 17 divided by 5 is 2, since 17 = 3 * 5 + 2.",
    "Parentheses first: (2 + 3) * 4 = 20, while 2 + 3 * 4 = 14. Powers: 2^10 = 1024 and 3^3 = 27.",
    "Digits 0 1 2 3 4 5 6 7 8 9 and operators + - * / = < > ( ) ^ % appear often in arithmetic. "
    "The final answer is boxed: \\boxed{42}. Done.",
)


def _special_tokens(with_markers: bool) -> list[str]:
    extra = [*MARKERS] if with_markers else []
    return [EOS, IM_START, IM_END, THINK_START, THINK_END, *extra]


def build_tokenizer(
    corpus: Iterable[str] | None = None, vocab_size: int = 512, *, with_markers: bool = True
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer locally (deterministic for a given corpus).

    Byte-level so decode(encode(text)) == text for any text; digits split one by one so arithmetic
    is learnable; `assistant`/`user`/`system` are single tokens because the block-masking gate
    looks for `<|im_start|>` followed by one `assistant` id. `with_markers=False` leaves out the
    block markers (to exercise `add_memento_tokens`).
    """
    texts = list(DEFAULT_CORPUS if corpus is None else corpus)
    specials = _special_tokens(with_markers)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in specials],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # Reuses the BPE id when training already merged the word, else appends a new id.
    tok.add_tokens([AddedToken(w, special=False, normalized=False) for w in ROLE_WORDS])
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        pad_token=EOS,
        clean_up_tokenization_spaces=False,
    )
    hf.chat_template = CHATML_TEMPLATE
    return hf


def build_tiny_model(
    tokenizer,
    *,
    layers: int = 4,
    hidden: int = 128,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 384,
    max_position: int = 4096,
    seed: int = 0,
    attn_implementation: str = "sdpa",
) -> Qwen3ForCausalLM:
    """A small standard Qwen3 (fp32, tied embeddings) sized to the tokenizer; seeded, and without
    touching the global RNG, so fixtures are reproducible."""
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        max_position_embeddings=max_position,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        dtype="float32",
        attn_implementation=attn_implementation,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
    model.to(torch.float32)
    # As in Qwen3's chat checkpoints: a chat turn ends at <|im_end|>, so servers that stop only on the
    # generation config's EOS ids (vLLM) stop where our engine does.
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(IM_END)]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval()


def save_toy_model(directory: str | Path, tokenizer, model) -> Path:
    """Save tokenizer and model side by side so the Auto classes load them offline."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(directory)
    model.save_pretrained(directory)
    return directory


def make_toy_checkpoint(
    directory: str | Path,
    seed: int = 0,
    *,
    corpus: Iterable[str] | None = None,
    vocab_size: int = 512,
    **model_kwargs,
) -> Path:
    """Build the toy tokenizer + tiny model and save both to `directory` (returned)."""
    tokenizer = build_tokenizer(corpus, vocab_size=vocab_size)
    model = build_tiny_model(tokenizer, seed=seed, **model_kwargs)
    return save_toy_model(directory, tokenizer, model)
