"""Answer grading: hand-checked equivalences, extraction order, junk, and off-main-thread use."""

from __future__ import annotations

import threading
import time

import pytest

from memento.eval.grading import (
    cluster_answers,
    extract_choice_answer,
    extract_math_answer,
    grade,
    normalize_answer,
)

EQUIVALENT = [
    ("\\frac{1}{2}", "The answer is $0.5$."),
    ("\\frac{3}{4}", "so \\boxed{\\dfrac{3}{4}}"),
    ("\\dfrac{14}{3}", "\\boxed{\\frac{14}{3}}"),
    ("2\\sqrt{2}", "\\boxed{\\sqrt{8}}"),
    ("\\frac{\\sqrt{3}}{3}", "\\boxed{\\frac{1}{\\sqrt{3}}}"),
    ("11\\sqrt2", "\\boxed{11\\sqrt{2}}"),
    ("[1,3)", "Final Answer: $[1, 3)$"),
    ("(-\\infty, 2]", "\\boxed{(-\\infty,2]}"),
    ("10", "\\boxed{10\\text{ cm}}"),
    ("10\\text{ cm}", "\\boxed{10}"),
    ("90^\\circ", "\\boxed{90}"),
    ("30", "\\boxed{30^\\circ}"),
    ("50\\%", "\\boxed{50}"),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "\\boxed{(3,\\frac{\\pi}{2})}"),
    ("\\text{Evelyn}", "\\boxed{\\text{Evelyn}}"),
    ("x=5", "\\boxed{5}"),
    ("1,-2", "\\boxed{-2, 1}"),
    ("6 - 5i", "\\boxed{6-5i}"),
    ("025", "Final Answer: 25"),
    ("204", "<think>maybe \\boxed{3}</think>\n\nThe walk takes \\boxed{204} minutes."),
    ("204", "So the walk takes 204 minutes."),
]

DIFFERENT = [
    ("\\frac{1}{2}", "\\boxed{\\frac{1}{3}}"),
    ("[1,3)", "\\boxed{[1,3]}"),
    ("2\\sqrt{2}", "\\boxed{2\\sqrt{3}}"),
    ("204", "<think>\\boxed{204}</think>\n\nSo the answer is \\boxed{205}."),
    ("10", "no idea"),
]


@pytest.mark.parametrize(("gold", "response"), EQUIVALENT)
def test_equivalent_answers_are_correct(gold, response):
    g = grade(response, gold)
    assert g.correct, (gold, response, g)
    assert g.extracted


@pytest.mark.parametrize(("gold", "response"), DIFFERENT)
def test_different_answers_are_wrong(gold, response):
    assert not grade(response, gold).correct


def test_extraction_order_follows_the_paper():
    assert extract_math_answer("x $1$ Final Answer: 2 and \\boxed{3}") == ("3", "boxed")
    assert extract_math_answer("we get $1$. Final Answer: $2$") == ("2", "pattern")
    assert extract_math_answer("the answer is 7.") == ("7", "pattern")
    assert extract_math_answer("first $1$ then $x=4$ done") == ("x=4", "inline_math")
    assert extract_math_answer("we are left with 12") == ("12", "raw")
    assert extract_math_answer("") == (None, "none")
    # nested braces survive
    assert extract_math_answer("\\boxed{\\frac{\\sqrt{3}}{2}}")[0] == "\\frac{\\sqrt{3}}{2}"
    # the final answer after </think> wins over boxes inside the reasoning
    assert extract_math_answer("<think>\\boxed{1}</think>\n\n\\boxed{2}")[0] == "2"
    # a cut-off trace (no </think>) is read as a whole
    assert extract_math_answer("<think>so far \\boxed{9}")[0] == "9"


def test_choice_letters():
    assert extract_choice_answer("Thus **Option C** fits.\n\n**Answer: C) similar polarities.**")[0] == "C"
    assert extract_choice_answer("\\boxed{B}")[0] == "B"
    assert extract_choice_answer("The correct answer is (D).")[0] == "D"
    assert extract_choice_answer("Between A and B, I pick B")[0] == "B"
    assert extract_choice_answer("nothing here")[0] is None
    assert grade("Answer: C", "C", "choice").correct
    assert extract_choice_answer("The answer is a tricky one")[0] is None
    assert not grade("Answer: A", "C", "choice").correct


def test_normalization_fallback():
    assert normalize_answer("\\dfrac{1}{2}") == normalize_answer("\\frac{1}{2}")
    assert normalize_answer("$10\\text{ cm}$") == "10"
    assert normalize_answer("1,000") == "1000"
    assert normalize_answer("2.50") == "2.5"
    assert normalize_answer("\\text{(B)}") == "(b)"


JUNK = [
    "",
    "   ",
    "\\boxed{",
    "\\boxed{}" * 50,
    "}" * 10_000,
    "$" * 9_999,
    "x" * 2_000_000,
    "\\boxed{" * 5_000 + "1",
    "\u0000\ufffd\U0001f600 answer: \\frac{",
    "Final Answer: " + "9" * 5_000,
]


@pytest.mark.parametrize("response", JUNK)
def test_junk_never_crashes(response):
    start = time.perf_counter()
    for kind, gold in (("math", "12"), ("choice", "A")):
        g = grade(response, gold, kind)
        assert g.correct is False
    assert time.perf_counter() - start < 30


def test_none_and_non_string_inputs():
    assert grade(None, "1").correct is False  # type: ignore[arg-type]
    assert grade(123, "123").correct  # type: ignore[arg-type]


def test_grading_off_the_main_thread_with_a_hanging_expression():
    """Signal timeouts cannot fire in a worker thread; the isolated worker process bounds it."""
    results: dict = {}

    def work():
        results["ok"] = grade("\\boxed{\\dfrac{1}{2}}", "0.5")
        results["hang"] = grade("\\boxed{2^{2^{2^{100}}}}", "5", timeout=1)
        results["choice"] = grade("Answer: B", "B", "choice")

    thread = threading.Thread(target=work)
    start = time.perf_counter()
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert results["ok"].correct
    assert results["hang"].correct is False and results["hang"].extracted == "2^{2^{2^{100}}}"
    assert results["choice"].correct
    assert time.perf_counter() - start < 60


def test_cluster_answers_groups_equivalent_forms():
    labels = cluster_answers(["\\frac{1}{2}", "0.5", None, "3", "\\dfrac12"])
    assert labels[0] == labels[1] == labels[4]
    assert labels[2] is None
    assert labels[3] != labels[0]
    assert cluster_answers(["A", "B", "A"], "choice") == [0, 1, 0]
