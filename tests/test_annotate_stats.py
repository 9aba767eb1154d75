"""The annotation report: Figure 3 quantities per domain, in characters and tokens, and the judge's
first-pass and final pass rates."""

from __future__ import annotations

from memento.annotate.stats import compute_stats


def _record(domain: str | None, blocks: list[str], mementos: list[str], scores: list[tuple[float, float]]):
    sentences = list(blocks)  # one sentence per block keeps the arithmetic visible
    return {
        "id": f"{domain}-{len(blocks)}",
        "extra": {"domain": domain} if domain else {},
        "sentences": sentences,
        "blocks": [[i, i] for i in range(len(blocks))],
        "mementos": mementos,
        "block_tokens": [len(b.split()) for b in blocks],
        "memento_tokens": [len(m.split()) for m in mementos],
        "compression": [len(m.split()) / len(b.split()) for b, m in zip(blocks, mementos, strict=True)],
        "judge_scores": [final for _, final in scores],
        "memento_details": [{"iterations": [{"score": first}, {"score": final}]} for first, final in scores],
        "scoring": {"failures": [], "filled_from_heuristic": []},
        "segmentation": {"warning": None},
        "backend": {"tokenizer": "regex"},
    }


def test_stats_per_domain_in_characters_with_first_pass_rate():
    math = _record("math", ["a" * 100, "b" * 300], ["x" * 20, "y" * 30], [(5, 9), (8, 8)])
    code = _record("code", ["c" * 200], ["z" * 50], [(3, 6)])
    stats = compute_stats([math, code])
    m, c, everything = stats["by_domain"]["math"], stats["by_domain"]["code"], stats["by_domain"]["all"]
    assert m["traces"] == 1 and m["blocks_per_trace"]["median"] == 2
    assert m["block_chars"]["median"] == 200 and m["memento_chars"]["median"] == 25
    assert m["compression_chars"]["median"] == 0.15
    assert c["compression_chars"]["median"] == 0.25
    assert m["judge_first_pass_rate"] == 0.5 and m["judge_pass_rate"] == 1.0
    assert c["judge_first_pass_rate"] == 0.0 and c["judge_pass_rate"] == 0.0
    assert everything["traces"] == 2 and stats["judge_first_pass_rate"] == round(1 / 3, 4)
    assert stats["judge_pass_rate"] == round(2 / 3, 4)
    assert compute_stats([math], threshold=9)["judge_pass_rate"] == 0.5


def test_stats_without_domains_report_one_group():
    stats = compute_stats([_record(None, ["a" * 10], ["b"], [(9, 9)])])
    assert list(stats["by_domain"]) == ["all"]
