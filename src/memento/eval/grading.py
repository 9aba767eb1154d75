"""Answer checking: pull one final answer out of a response, then compare it with the gold answer.

Extraction follows the paper's order — the last ``\\boxed{}``, then "Final Answer:" / "the answer
is" patterns, then the last inline math, then the raw (normalized) last line — so every sample
has exactly one `extracted` answer to report and to vote with. Math answers are compared with
Math-Verify (``verify(gold, pred)``, gold first: the relation is not symmetric), with a
normalized string comparison as fallback; choice answers compare letters.

Math-Verify's timeouts use SIGALRM, which only works in the main thread. On the main thread we
keep them; anywhere else the check runs in a spawned worker process whose wall clock we bound and
which we kill when it overruns (sympy can hang forever on e.g. ``2^{2^{2^{100}}}``). Inputs are
capped in length in both cases. Nothing here raises on junk: the worst outcome is "incorrect".
"""

from __future__ import annotations

import json
import logging
import re
import select
import subprocess
import sys
import threading
from dataclasses import dataclass
from functools import lru_cache

MAX_RESPONSE_CHARS = 40_000  # answers live at the end; longer responses are read from the tail
MAX_CANDIDATE_CHARS = 400  # a final answer longer than this is prose, not an answer
DEFAULT_TIMEOUT_S = 5

logging.getLogger("math_verify").setLevel(logging.ERROR)  # it warns once per disabled timeout


@dataclass(frozen=True)
class Grade:
    """Outcome for one response: was it right, what answer was read, and how it was found."""

    correct: bool
    extracted: str | None
    method: str  # boxed | pattern | inline_math | raw | letter | none


# --- extraction -------------------------------------------------------------------------------

_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_PATTERN_RE = re.compile(
    r"(?:final\s+answer\s*(?:is)?\s*[:：]?|the\s+(?:final\s+)?answer\s+is\s*[:：]?|\banswer\s*[:：])"
    r"[ \t]*(?P<ans>[^\n]+)",
    re.IGNORECASE,
)
_INLINE_MATH_RE = re.compile(
    r"\$\$(?P<a>.+?)\$\$|\\\[(?P<b>.+?)\\\]|\\\((?P<c>.+?)\\\)|(?<!\\)\$(?P<d>[^$]+?)(?<!\\)\$", re.DOTALL
)
_LETTER_STANDALONE_RE = re.compile(r"(?<![A-Za-z0-9_\\])\(?([A-D])\)?(?![A-Za-z0-9_'’])")
_LETTER_PATTERN_RE = re.compile(  # case-insensitive words, upper-case letter ("answer is a ..." is prose)
    r"(?i:answer|option|choice)\s*(?i:is|:|：)?\s*(?i:option\s*)?[\s*(\[]*([A-D])(?![A-Za-z0-9])"
)


def answer_region(text: str) -> str:
    """The part of a response that holds the final answer: after the last `</think>` when there
    is text after it (a finished reasoning trace), otherwise the whole text (cut-off traces)."""
    if not isinstance(text, str):
        return ""
    head, sep, tail = text.rpartition("</think>")
    region = tail if sep and tail.strip() else text
    return region[-MAX_RESPONSE_CHARS:]


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` / `\\fbox{...}` with balanced braces (None if absent)."""
    starts = [m.end() for m in _BOXED_RE.finditer(text)]
    for start in reversed(starts[-20:]):  # bounded: junk with thousands of opens stays linear
        depth, i = 1, start
        limit = min(len(text), start + 10 * MAX_CANDIDATE_CHARS)
        while i < limit and depth:
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
            i += 1
        if depth == 0:
            return text[start : i - 1].strip()
    return None


def _clean_pattern_answer(ans: str) -> str:
    ans = ans.strip().strip("*").strip()
    boxed = last_boxed(ans)
    if boxed is not None:
        return boxed
    math = _last_inline_math(ans)
    if math is not None:
        return math
    return ans.rstrip(".。").strip().strip("*").strip()


def _last_inline_math(text: str) -> str | None:
    last = None
    for m in _INLINE_MATH_RE.finditer(text):
        content = next(g for g in m.groups() if g is not None).strip()
        if content:
            last = content
    return last


def extract_math_answer(text: str) -> tuple[str | None, str]:
    """(answer, method) following the paper's candidate order."""
    region = answer_region(text)
    if not region.strip():
        return None, "none"
    boxed = last_boxed(region)
    if boxed:
        return boxed[:MAX_CANDIDATE_CHARS], "boxed"
    matches = list(_PATTERN_RE.finditer(region))
    if matches:
        ans = _clean_pattern_answer(matches[-1].group("ans"))
        if ans:
            return ans[:MAX_CANDIDATE_CHARS], "pattern"
    math = _last_inline_math(region)
    if math:
        return math[:MAX_CANDIDATE_CHARS], "inline_math"
    lines = [ln.strip() for ln in region.strip().splitlines() if ln.strip()]
    if lines and len(lines[-1]) <= MAX_CANDIDATE_CHARS:
        # prose around a bare answer ("so it takes 204 minutes"): keep the last number-like token
        tokens = re.findall(r"-?\\?\d[\w.,/\\{}^%]*", lines[-1])
        raw = tokens[-1] if tokens and len(lines[-1].split()) > 1 else lines[-1]
        return raw.rstrip(".,;:").strip(), "raw"
    return None, "none"


def extract_choice_answer(text: str) -> tuple[str | None, str]:
    """A letter A–D: a boxed letter, then "answer is X" patterns, then the last standalone letter."""
    region = answer_region(text)
    boxed = last_boxed(region)
    if boxed:
        m = re.fullmatch(r"\s*(?:\\text\{)?\s*\(?([A-D])\)?\s*\}?\s*", boxed)
        if m:
            return m.group(1), "boxed"
    matches = list(_LETTER_PATTERN_RE.finditer(region))
    if matches:
        return matches[-1].group(1), "pattern"
    letters = _LETTER_STANDALONE_RE.findall(region)
    if letters:
        return letters[-1], "letter"
    return None, "none"


# --- string normalization fallback ------------------------------------------------------------

_TEXT_RE = re.compile(r"\\(?:text|textbf|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
_UNIT_WORDS = (
    r"(?:cm|m|km|mm|inches|inch|feet|ft|units|degrees|degree|meters|dollars|cents|hours|minutes|seconds|sq)"
)


def normalize_answer(ans: str) -> str:
    """A loose canonical string form (fallback when Math-Verify cannot parse either side)."""
    s = str(ans)[:MAX_CANDIDATE_CHARS].strip()
    s = s.strip("$").strip()
    for _ in range(3):
        s = _TEXT_RE.sub(r"\1", s)
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = re.sub(r"\\left|\\right|\\!|\\,|\\;|\\:|\\ |~", "", s)
    s = re.sub(r"\^\s*\{?\\circ\}?|°|\\%|%", "", s)
    s = re.sub(rf"\s*\b{_UNIT_WORDS}\b\.?$", "", s)
    s = s.replace("\\$", "")
    s = re.sub(r"\s+", "", s).rstrip(".").lower()
    if re.fullmatch(r"-?\d+(?:,\d{3})+(?:\.\d+)?", s):  # 1,000 -> 1000
        s = s.replace(",", "")
    if re.fullmatch(r"-?\d+\.\d+", s):  # 2.50 -> 2.5, 3.0 -> 3
        s = s.rstrip("0").rstrip(".")
    return s


# --- Math-Verify, bounded ---------------------------------------------------------------------


def _as_latex(ans: str) -> str:
    ans = ans[:MAX_CANDIDATE_CHARS]
    return ans if ("\\boxed" in ans or "$" in ans) else f"\\boxed{{{ans}}}"


@lru_cache(maxsize=4096)
def _parsed(ans: str, timeout: int | None):
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    return parse(
        _as_latex(ans),
        extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
        parsing_timeout=timeout,
    )


def _verify_local(gold: str, pred: str, timeout: int | None) -> bool:
    """Math-Verify comparison in this process (timeout None = no signals, caller bounds the work)."""
    from math_verify import verify

    try:
        g, p = _parsed(gold, timeout), _parsed(pred, timeout)
        if not g or not p:
            return False
        return bool(verify(g, p, timeout_seconds=timeout))
    except BaseException as exc:  # noqa: BLE001 — junk must never crash grading
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            raise
        return False


def _serve() -> None:
    """Worker process loop: JSON lines in, JSON lines out. It runs comparisons in its own main
    thread, so Math-Verify's signal timeouts work there."""
    import json
    import sys

    for line in sys.stdin:
        try:
            gold, pred, timeout = json.loads(line)
            ok = _verify_local(str(gold), str(pred), int(timeout))
        except (ValueError, TypeError):
            ok = False
        sys.stdout.write("1\n" if ok else "0\n")
        sys.stdout.flush()


class _IsolatedVerifier:
    """One worker process shared by all non-main threads; killed and restarted when it overruns.

    A plain subprocess (not multiprocessing) so it works whatever the caller's __main__ is."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None

    def _start(self) -> None:
        code = "from memento.eval.grading import _serve; _serve()"
        self._proc = subprocess.Popen(
            [sys.executable, "-c", code],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            bufsize=1,
        )

    def _stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(timeout=5)
        self._proc = None

    def verify(self, gold: str, pred: str, timeout: int) -> bool:
        with self._lock:
            try:
                if self._proc is None or self._proc.poll() is not None:
                    self._start()
                assert self._proc is not None and self._proc.stdin and self._proc.stdout
                self._proc.stdin.write(json.dumps([gold, pred, timeout]) + "\n")
                self._proc.stdin.flush()
                # worker start-up (imports) + its own signal timeouts on parse and compare
                ready, _, _ = select.select([self._proc.stdout], [], [], 4 * timeout + 30)
                if ready:
                    line = self._proc.stdout.readline()
                    if line:
                        return line.strip() == "1"
            except (OSError, ValueError):
                pass
            self._stop()  # overran or died: kill it, answer "not verified"
            return False

    def close(self) -> None:
        with self._lock:
            self._stop()


_ISOLATED = _IsolatedVerifier()


def math_equal(gold: str, pred: str, timeout: int = DEFAULT_TIMEOUT_S) -> bool:
    """True if `pred` is mathematically the gold answer (Math-Verify, then normalized strings)."""
    if not pred or not gold:
        return False
    gold, pred = str(gold)[:MAX_CANDIDATE_CHARS], str(pred)[:MAX_CANDIDATE_CHARS]
    if normalize_answer(gold) == normalize_answer(pred):
        return True
    if threading.current_thread() is threading.main_thread():
        return _verify_local(gold, pred, timeout)
    return _ISOLATED.verify(gold, pred, timeout)


def grade(response: str, gold: str, kind: str = "math", timeout: int = DEFAULT_TIMEOUT_S) -> Grade:
    """Grade one response against its gold answer; never raises on junk input."""
    if not isinstance(response, str):
        response = "" if response is None else str(response)
    if kind == "choice":
        letter, method = extract_choice_answer(response)
        gold_letter = re.sub(r"[^A-D]", "", str(gold).upper())[:1]
        return Grade(letter is not None and letter == gold_letter, letter, method)
    if kind != "math":
        raise ValueError(f"unknown answer kind {kind!r}; use math or choice")
    extracted, method = extract_math_answer(response)
    if extracted is None:
        return Grade(False, None, method)
    return Grade(math_equal(str(gold), extracted, timeout), extracted, method)


def same_answer(a: str | None, b: str | None, kind: str = "math", timeout: int = DEFAULT_TIMEOUT_S) -> bool:
    """Whether two extracted answers are the same vote (for maj@k): equivalence either way."""
    if a is None or b is None:
        return False
    if kind == "choice":
        return a == b
    return math_equal(a, b, timeout) or math_equal(b, a, timeout)


def cluster_answers(answers: list[str | None], kind: str = "math", timeout: int = DEFAULT_TIMEOUT_S) -> list:
    """Label each answer with the index of its equivalence class (None for no answer)."""
    reps: list[str] = []
    labels: list[int | None] = []
    for ans in answers:
        if ans is None:
            labels.append(None)
            continue
        for i, rep in enumerate(reps):
            if ans == rep or same_answer(rep, ans, kind, timeout):
                labels.append(i)
                break
        else:
            reps.append(ans)
            labels.append(len(reps) - 1)
    return labels
