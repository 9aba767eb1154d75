"""memento.probe: the exact text-only baseline, the split by passcode, probes that find a planted
signal and not noise, KV extraction and patching against token-by-token oracles, and
`memento probe --quick` end to end (shapes, the split, resume, refusals)."""

from __future__ import annotations

import itertools
import json
import random
from collections import Counter, defaultdict

import pytest
import torch
from typer.testing import CliRunner

from engine_helpers import evicting_decode, one_thread, sharp_model  # noqa: F401 (fixture)
from memento.cli import app
from memento.hf import cache_kv, remove_span, with_cache
from memento.masking import BlockMaskingConfig, attention_mask, evictions
from memento.probe.ablation import score_probe_sample
from memento.probe.baseline import digit_sum_counts, given_total, nothing
from memento.probe.data import DEV, TRAIN, VAL, label_sets, probe_problems
from memento.probe.features import extract, memento_spans, pooled
from memento.probe.patching import block_marks, run_pairs, same_total_twin, spliced_entries
from memento.probe.probes import ProbeConfig, fit_probes
from memento.probe.stats import bootstrap, bootstrap_many
from memento.toy.demo import DemoConfig, run_demo
from memento.toy.tasks import ProbeTask
from memento.train.data import tokenize_trace

pytestmark = pytest.mark.usefixtures("one_thread")
TASK = ProbeTask()


def test_text_baseline_matches_brute_force():
    for n in (2, 3):
        by_total: dict[int, Counter] = defaultdict(Counter)
        for digits in itertools.product(range(10), repeat=n):
            by_total[sum(digits)][digits[0]] += 1
        brute = sum(max(c.values()) for c in by_total.values()) / 10**n
        assert given_total(n).per_digit == pytest.approx(brute)
        assert given_total(n).exact == pytest.approx(len(by_total) / 10**n)
    assert sum(digit_sum_counts(5)) == 10**5
    assert given_total(5).per_digit == pytest.approx(0.1603)
    assert nothing().per_digit == 0.1


def test_label_sets_split_by_passcode():
    problems = probe_problems(TASK, 400, target=2, seed=0)
    assert problems == probe_problems(TASK, 400, target=2, seed=0)
    sets = label_sets(problems, seed=0)
    assert sets["passcode"].labels.shape == (400, 5)
    assert sets["digits"].labels[0].tolist() == list(problems[0].digits[2])
    assert sets["digits_last"].block == 9
    # the control task is a fixed function of the passcode
    by_code = {}
    for key, row in zip(sets["control"].keys, sets["control"].labels.tolist(), strict=True):
        assert by_code.setdefault(key, row) == row
    for name, ls in sets.items():
        split = ls.split(0.2, 0.1, seed=0)
        parts = {k: {ls.keys[i] for i in v.tolist()} for k, v in split.items()}
        assert (
            not parts[TRAIN] & parts[VAL] and not parts[TRAIN] & parts[DEV] and not parts[DEV] & parts[VAL]
        ), name
        assert sum(len(v) for v in split.values()) == 400 and 40 < len(split[VAL]) < 130
    # text baselines: chance before the block, everything at its own memento, the total after it
    assert sets["digits"].text_baseline(-1).per_digit == 0.1
    assert sets["digits"].text_baseline(0).per_digit == 1.0
    assert sets["digits"].text_baseline(0, "restart_kv").per_digit == pytest.approx(0.1603)
    assert sets["digits"].text_baseline(3).per_digit == pytest.approx(0.1603)
    assert sets["passcode"].text_baseline(3).per_digit == 0.1
    assert sets["passcode"].text_baseline(3, "full").per_digit == 1.0


def test_probes_find_a_planted_signal_and_not_noise():
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (1200, 5), generator=gen)
    x = torch.randn(2, 1200, 16, generator=gen)
    x[0, :, :10] += 3.0 * torch.nn.functional.one_hot(y[:, 0], 10).float()  # digit 0 readable in group 0
    for kind in ("mlp", "linear"):
        cfg = ProbeConfig(kind=kind, hidden=(32,), epochs=10, batch_size=128, lr=5e-3)
        fitted = fit_probes(x[:, :900], y[:900], x[:, 900:1000], y[900:1000], cfg)
        right = (fitted.predict(x[:, 1000:]) == y[1000:][None]).float()
        assert right[0, :, 0].mean() > 0.6
        assert right[1].mean() < 0.16  # noise stays near chance
        assert fitted.predict(x[:, 1000:]).shape == (2, 200, 5)


def test_probe_generations_are_scored_by_their_own_digits():
    task = ProbeTask(worked=True)
    trace = task.trace(task.problems(1, seed=1)[0])
    text = trace.render() + "<|im_end|>"
    assert score_probe_sample(task, text, "stop") == {
        "well_formed": True, "correct": True, "mementos_correct": 1.0, "reads_memento": 1.0, "adds_in_block": 1.0,
    }  # fmt: skip
    first = trace.blocks[3].reasoning.split()[0]
    digit, _, total = first.partition(":")
    misread = text.replace(first, f"{digit}:{int(total) + 1:03d}", 1)  # block 3 misreads memento 2
    score = score_probe_sample(task, misread, "stop")
    assert score["reads_memento"] == pytest.approx(8 / 9) and score["correct"] and score["well_formed"]
    wrong = text.replace(trace.answer, "sum=000")
    assert not score_probe_sample(task, wrong, "stop")["correct"]
    assert not score_probe_sample(task, text, "length")["well_formed"]


def test_bootstrap_intervals():
    scores = torch.tensor([0.0, 1.0] * 50)
    est = bootstrap(scores, resamples=500)
    assert est.mean == 0.5 and est.low < 0.5 < est.high and est.high - est.low < 0.3
    a, b = bootstrap_many(torch.stack([scores, scores]), resamples=200)
    assert (a.low, a.high) == (b.low, b.high)


@pytest.fixture(scope="module")
def tiny(toy_tokenizer, markers):
    model = sharp_model(toy_tokenizer, seed=5)
    problems = probe_problems(TASK, 4, target=2, seed=3)
    ids = [tokenize_trace(TASK.trace(q), toy_tokenizer).input_ids for q in problems]
    return model, problems, ids


def test_extracted_features_are_the_engines_cached_kv(tiny, markers):
    model, _, ids = tiny
    feats = extract(model, ids, markers, "memento", batch_size=3)
    layers = len(model.model.layers)
    ss, se = memento_spans(ids[0], markers)[0]
    n = se - ss  # `<|summary_start|>` and the tokens of `sum=NNN`
    assert feats.shape == (4, 10, layers, n, 2 * 2 * 16)  # [keys | values] of 2 kv heads x 16
    assert pooled(feats, "concat").shape == (4, 10, layers, n * 64)
    assert pooled(feats, "mean").shape == (4, 10, layers, 64)
    cache, slots, _ = evicting_decode(model, ids[1], markers, BlockMaskingConfig())
    for j, (ss, se) in enumerate(memento_spans(ids[1], markers)):
        for t, p in enumerate(range(ss, se)):
            for layer in range(layers):
                keys, values = cache_kv(cache)[layer]
                k, v = keys[0][:, slots.index(p)].reshape(-1), values[0][:, slots.index(p)].reshape(-1)
                assert torch.allclose(feats[1, j, layer, t], torch.cat([k, v]), atol=1e-4)
    direct = extract(model, ids, markers, "full")
    assert torch.allclose(direct[:, 0], feats[:, 0], atol=1e-4)  # the first memento precedes any eviction
    assert not torch.allclose(direct[:, 3], feats[:, 3], atol=1e-3)
    fair = extract(model, ids, markers, "restart_kv")
    assert not torch.allclose(fair[:, 3], feats[:, 3], atol=1e-3)


@torch.no_grad()
def test_patched_continuation_reads_the_donors_kv(tiny, toy_tokenizer, markers):
    """Oracle: B's cache up to its block-2 memento with A's KV copied into the kept slots
    [be, se) and the block dropped, then B's remaining tokens decoded one by one."""
    from transformers import DynamicCache

    model, problems, ids = tiny
    b_problem = problems[0]
    a_problem = same_total_twin(b_problem, 2, random.Random(1))
    assert a_problem.digits[2] != b_problem.digits[2] and sum(a_problem.digits[2]) == sum(b_problem.digits[2])
    assert TASK.trace(a_problem).blocks[3:] == TASK.trace(b_problem).blocks[3:]
    ids_b = ids[0]
    ids_a = tokenize_trace(TASK.trace(a_problem), toy_tokenizer).input_ids
    marks = block_marks(ids_b, markers, 2)
    entries = spliced_entries(ids_b, markers, 2, ids_a)
    out = model(
        input_ids=torch.tensor([entries.tokens]),
        position_ids=torch.tensor([entries.positions]),
        attention_mask=entries.visible[None, None],
    ).logits[0]

    def prefix_cache(ids):
        mask = attention_mask(ids, markers)[: marks.se, : marks.se]
        cache = DynamicCache()
        model(
            input_ids=torch.tensor([ids[: marks.se]]), position_ids=torch.arange(marks.se)[None],
            attention_mask=mask[None, None], **with_cache(model, cache),
        )  # fmt: skip
        return cache

    cache, donor = prefix_cache(ids_b), prefix_cache(ids_a)
    for (keys, values), (donor_keys, donor_values) in zip(cache_kv(cache), cache_kv(donor), strict=True):
        keys[:, :, marks.be : marks.se] = donor_keys[:, :, marks.be : marks.se]
        values[:, :, marks.be : marks.se] = donor_values[:, :, marks.be : marks.se]
    kept = [
        p
        for p in range(marks.se)
        if not any(e.start <= p < e.end for e in evictions(ids_b, markers) if e.trigger <= marks.se)
    ]
    dropped = sorted(set(range(marks.se)) - set(kept), reverse=True)
    for p in dropped:
        remove_span(cache, p, p + 1)
    slots = list(kept)
    evs = evictions(ids_b, markers)
    worst = 0.0
    for p in range(marks.se, len(ids_b)):
        for ev in (e for e in evs if e.trigger == p and e.trigger > marks.se):
            first = sum(1 for s in slots if s < ev.start)
            last = sum(1 for s in slots if s < ev.end)
            remove_span(cache, first, last)
            del slots[first:last]
        logits = model(
            input_ids=torch.tensor([[ids_b[p]]]), position_ids=torch.tensor([[p]]), **with_cache(model, cache)
        ).logits[0, -1]
        slots.append(p)
        worst = max(worst, (logits - out[p]).abs().max().item())
    assert worst <= 1e-4
    # the patch matters (not a vacuous check), and everything before the memento is untouched
    _, _, clean = evicting_decode(model, ids_b, markers, BlockMaskingConfig())
    assert (clean[: marks.se] - out[: marks.se]).abs().max() <= 1e-4
    assert (clean[marks.se :] - out[marks.se : len(ids_b)]).abs().max() > 1e-3
    res = run_pairs(model, [(ids_a, ids_b)], markers, 2)
    assert res["patched"][0].kl_all > 0 and res["features"]["patched"].shape[1] == 10
    assert torch.allclose(
        res["features"]["clean"][0], extract(model, [ids_b], markers, "memento")[0], atol=1e-5
    )


def test_probe_quick_end_to_end(tmp_path):
    runner = CliRunner()
    out = tmp_path / "study"
    result = runner.invoke(app, ["probe", "--quick", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert json.loads(result.stdout) == report  # --json: the report on stdout, progress on stderr
    for name in ("report.md", "fig_layers.png", "fig_distance.png", "fig_training.png"):
        assert (out / name).is_file(), name
    feats = torch.load(out / "features" / "memento.pt")
    assert feats.shape == (60, 10, 2, 6, 2 * 1 * 16)
    probes = report["probes"]
    assert set(probes["split_key_overlap"].values()) == {0}  # no validation passcode seen in training
    assert all(sizes["val"] > 0 and sizes["train"] > 0 for sizes in probes["split_sizes"].values())
    res = probes["results"]
    assert {c["distance"] for c in res["passcode"]["mlp"]["memento"]} == set(range(-2, 8))
    assert len(res["passcode"]["mlp"]["memento"][0]["seeds"]) == 2
    assert {c["distance"] for c in res["digits_last"]["mlp"]["memento"]} == set(range(-9, 1))
    assert set(report["ablation"]["memento_model"]) == {"memento", "restart", "restart_kv"}
    assert report["patching"]["pairs"] == 6
    # resume: nothing is retrained; other settings in the same directory are refused
    before = (out / "models" / "memento" / "model.safetensors").stat().st_mtime_ns
    again = runner.invoke(app, ["probe", "--quick", "--out", str(out)])
    assert again.exit_code == 0 and "already done" in again.output
    assert (out / "models" / "memento" / "model.safetensors").stat().st_mtime_ns == before
    other = runner.invoke(app, ["probe", "--quick", "--out", str(out), "--seed", "1"])
    assert other.exit_code == 2 and "other settings" in other.output
    # the demo model's restart ablation joins an existing study without retraining anything
    demo = tmp_path / "demo"
    run_demo(DemoConfig(out=demo, profile="smoke"))
    with_demo = runner.invoke(app, ["probe", "--quick", "--out", str(out), "--demo-run", str(demo)])
    assert with_demo.exit_code == 0, with_demo.output
    report = json.loads((out / "report.json").read_text())
    assert set(report["ablation_demo"]["modes"]) == {"memento", "restart", "restart_kv"}
    assert (out / "models" / "memento" / "model.safetensors").stat().st_mtime_ns == before


def test_difference_of_independent_samples():
    from memento.probe.stats import difference

    a, b = torch.tensor([1.0] * 80 + [0.0] * 20), torch.tensor([1.0] * 60 + [0.0] * 40)
    d = difference(a, b, resamples=500)
    assert d.mean == pytest.approx(0.2) and d.low < 0.2 < d.high and d.low > 0.05
