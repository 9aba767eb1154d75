"""Scoring under eviction: `Engine.replay` and `SamplingParams(logprobs=True)` report, per output
token, the log-probability the engine's own semantics give it (mode, masking config, evictions so
far), checked against the dense Stage-2 forward; forced tokens are flagged."""

from __future__ import annotations

import json
import random

import pytest
import torch
from typer.testing import CliRunner

from engine_helpers import (
    block_stream,
    dense_logits,
    header,
    one_thread,  # noqa: F401 (fixture)
    restart_reference_logits,
    sharp_model,
    text_ids,
)
from memento.engine import Engine, SamplingParams
from memento.engine.sampling import filter_logits
from memento.masking import BlockMaskingConfig

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-4


@pytest.fixture(scope="module")
def model(toy_tokenizer):
    return sharp_model(toy_tokenizer, seed=4)


@pytest.fixture(scope="module")
def pairs(toy_tokenizer, markers):
    rng = random.Random(21)
    words = text_ids(toy_tokenizer, markers)
    out = []
    for i in range(3):
        prompt = header(toy_tokenizer, f"score {i}") + block_stream(markers, words, rng, i % 2, tail=1)
        out.append((prompt, block_stream(markers, words, rng, 3)))
    return out


def _reference_logprobs(logits: torch.Tensor, ids: list[int], prompt_len: int) -> list[float]:
    """log-softmax of the reference row that predicts each output token."""
    logp = logits.log_softmax(-1)
    return [float(logp[p - 1, ids[p]]) for p in range(prompt_len, len(ids))]


@pytest.mark.parametrize(
    "mode,config",
    [
        ("memento", BlockMaskingConfig()),
        ("memento", BlockMaskingConfig(keep_last_n_blocks=1, mask_delimiters=True)),
        ("full", BlockMaskingConfig()),
        ("restart", BlockMaskingConfig()),
    ],
    ids=["keep0", "keep1-md", "full", "restart"],
)
def test_replay_logprobs_equal_dense_reference(model, toy_tokenizer, markers, pairs, mode, config):
    """Batched replay under a budget that preempts: every output token's log-prob equals the dense
    Stage-2 forward's (restart: its virtual-sequence definition)."""
    engine = Engine(model, toy_tokenizer, mode=mode, masking=config, kv_budget_tokens=80, max_batch_size=3)
    outs = engine.replay([p for p, _ in pairs], [o for _, o in pairs])
    assert engine.last_run["preemptions"] > 0
    reference = restart_reference_logits if mode == "restart" else dense_logits
    for (prompt, output), out in zip(pairs, outs, strict=True):
        ids = prompt + output
        want = _reference_logprobs(reference(model, ids, markers, engine.config), ids, len(prompt))
        assert out.forced is None and len(out.logprobs) == len(output)
        assert max(abs(a - b) for a, b in zip(out.logprobs, want, strict=True)) <= TOL


def test_replay_logprobs_see_the_eviction(model, toy_tokenizer, markers, pairs):
    """The scores depend on the semantics: memento and full replays of one stream differ after the
    first eviction and agree before it."""
    prompt, output = pairs[0]
    memento = Engine(model, toy_tokenizer, mode="memento").replay([prompt], [output])[0]
    full = Engine(model, toy_tokenizer, mode="full").replay([prompt], [output])[0]
    first = memento.evictions[0].trigger - len(prompt)  # index of the trigger token in the output
    diffs = [abs(a - b) for a, b in zip(memento.logprobs, full.logprobs, strict=True)]
    assert max(diffs[: first + 1]) <= TOL  # the trigger itself is still predicted from the block
    assert max(diffs[first + 1 :]) > 1e-2


def test_sampled_logprobs_are_the_sampling_distribution(model, toy_tokenizer, markers):
    """With temperature and filters, each sampled token's log-prob is under the filtered,
    tempered distribution it was drawn from (recomputed from the dense reference); generation
    with logprobs=True draws exactly the same tokens as without."""
    prompts = [header(toy_tokenizer, f"sample {i}") for i in range(2)]
    params = SamplingParams(
        temperature=0.8, top_k=40, top_p=0.9, max_new_tokens=20, seed=3, n=2, logprobs=True
    )
    engine = Engine(model, toy_tokenizer, mode="memento", max_batch_size=4)
    outs = engine.generate(prompts, params)
    plain = engine.generate(prompts, SamplingParams(**{**params.__dict__, "logprobs": False}))
    assert [o.output_ids for o in outs] == [o.output_ids for o in plain]
    assert all(o.logprobs is None and o.forced is None for o in plain)
    for out in outs:
        ids = out.token_ids
        logits = dense_logits(model, ids, markers, engine.config)
        filtered = filter_logits(logits, params).log_softmax(-1)
        n = len(out.prompt_ids)
        want = [float(filtered[p - 1, ids[p]]) for p in range(n, len(ids))]
        assert out.forced == [False] * len(out.output_ids)
        assert max(abs(a - b) for a, b in zip(out.logprobs, want, strict=True)) <= TOL
        assert all(lp <= 0 for lp in out.logprobs)


def test_temperature_one_generation_scores_like_replay(model, toy_tokenizer):
    """Unfiltered sampling at temperature 1 draws from the model's own distribution, so its
    log-probs equal a replay of the same tokens (the RL behaviour policy = the scoring pass)."""
    prompts = [header(toy_tokenizer, "rollout")]
    engine = Engine(model, toy_tokenizer, mode="memento")
    (out,) = engine.generate(prompts, SamplingParams(max_new_tokens=24, seed=11, logprobs=True))
    (replayed,) = engine.replay(prompts, [out.output_ids])
    assert max(abs(a - b) for a, b in zip(out.logprobs, replayed.logprobs, strict=True)) <= 1e-5


def test_capped_block_end_is_flagged_forced(model, toy_tokenizer, markers):
    """`max_block_tokens` imposes `<|block_end|>`: that token is flagged forced and carries the
    model's own log-prob of it; greedy tokens carry the model's log-softmax too."""
    config = BlockMaskingConfig(max_block_tokens=3)

    def open_block(seq, logits):
        logits = logits.clone()
        if len(seq.output_ids) == 0:
            logits[markers.block_start] += 1e4
        else:  # the model writes no block marker itself (mildly discouraged, still finite)
            logits[list(markers.block_markers)] -= 5.0
        return logits

    engine = Engine(model, toy_tokenizer, masking=config, logits_hook=open_block)
    (out,) = engine.generate(
        [header(toy_tokenizer, "cap")], SamplingParams(temperature=0, max_new_tokens=8, logprobs=True)
    )
    assert out.output_ids[4] == markers.block_end
    assert out.forced == [i == 4 for i in range(8)]
    ids = out.token_ids
    logits = dense_logits(model, ids, markers, engine.config)
    n = len(out.prompt_ids)
    hooked = []
    for i in range(len(out.output_ids)):
        row = logits[n + i - 1].clone()
        if i == 0:
            row[markers.block_start] += 1e4
        else:
            row[list(markers.block_markers)] -= 5.0
        hooked.append(float(row.log_softmax(-1)[ids[n + i]]))
    assert max(abs(a - b) for a, b in zip(out.logprobs, hooked, strict=True)) <= TOL
    assert out.logprobs[4] < -1.0  # the model itself did not want to close the block


def test_logprobs_must_be_a_bool():
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(logprobs=5)


def test_generate_json_logprobs(toy_model_dir, tmp_path):
    from memento.cli import app

    runner = CliRunner()
    base = ["generate", "--model", str(toy_model_dir), "--prompt", "What is 1 + 1?", "--max-new-tokens", "5"]
    result = runner.invoke(app, [*base, "--json", "--logprobs", "--seed", "0"])
    assert result.exit_code == 0, result.output
    (record,) = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    n_out = len(record["token_ids"]) - record["prompt_len"]
    assert len(record["logprobs"]) == n_out and record["forced"] == [False] * n_out
    plain = runner.invoke(app, [*base, "--json", "--seed", "0"])
    assert "logprobs" not in json.loads(plain.stdout.splitlines()[0])
    text = runner.invoke(app, [*base, "--logprobs"])
    assert text.exit_code == 2 and "--json" in text.stderr


def test_top_logprobs_rank_the_same_distribution(model, toy_tokenizer, markers):
    """`top_logprobs=k`: the k best tokens of the distribution each token's log-prob is under;
    the chosen token's log-prob is among them when it ranks in the top k (greedy: always first),
    and tokens filtered out by top_k carry -inf."""
    engine = Engine(model, toy_tokenizer, mode="memento")
    prompt = [header(toy_tokenizer, "alternatives")]
    (greedy,) = engine.generate(
        prompt, SamplingParams(temperature=0, max_new_tokens=12, logprobs=True, top_logprobs=3)
    )
    assert len(greedy.top_logprobs) == len(greedy.output_ids)
    for token, lp, top in zip(greedy.output_ids, greedy.logprobs, greedy.top_logprobs, strict=True):
        assert len(top) == 3 and top[0][0] == token and abs(top[0][1] - lp) <= 1e-6
        assert top[0][1] >= top[1][1] >= top[2][1]
    params = SamplingParams(
        temperature=0.7, top_k=2, max_new_tokens=12, seed=1, logprobs=True, top_logprobs=4
    )
    (out,) = engine.generate(prompt, params)
    ids = out.token_ids
    want = filter_logits(dense_logits(model, ids, markers, engine.config), params).log_softmax(-1)
    for i, top in enumerate(out.top_logprobs):
        row = want[len(out.prompt_ids) + i - 1]
        assert [t for t, _ in top[:2]] == row.topk(2).indices.tolist()
        assert max(abs(v - float(row[t])) for t, v in top[:2]) <= TOL
        assert top[2][1] == top[3][1] == float("-inf")
        assert dict(top)[out.output_ids[i]] == pytest.approx(out.logprobs[i], abs=1e-6)
    (plain,) = engine.generate(prompt, SamplingParams(temperature=0, max_new_tokens=3, logprobs=True))
    assert plain.top_logprobs is None
    with pytest.raises(ValueError, match="needs logprobs=True"):
        SamplingParams(top_logprobs=2)
