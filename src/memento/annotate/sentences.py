"""Structure-aware sentence splitting of a thinking text.

The splitter only ever *cuts* the text, so ``"".join(split_sentences(text)) == text`` holds for every
input (whitespace stays attached to the end of the sentence it follows). Code fences, inline code and
math (``$$…$$``, ``\\[…\\]``, ``\\(…\\)``, ``$…$``) are found first and masked, so no cut can fall inside
them. Cuts come from paragraph breaks, real sentence ends (``. ? !`` followed by a new sentence),
line breaks after a finished line or before a list item, and the edges of display blocks. Merge rules
then glue back what must stay together (colons, continuation words, derivations, short fragments,
runs of short math lines), with token counts from a pluggable :class:`TokenCounter`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

# ----------------------------------------------------------------------------------------------
# Token counting


@runtime_checkable
class TokenCounter(Protocol):
    """Anything that says how many tokens a text has (the student's tokenizer, ideally)."""

    name: str

    def count(self, text: str) -> int: ...


_REGEX_TOKEN = re.compile(r"\w+|[^\w\s]", re.UNICODE)


class RegexTokenCounter:
    """Words and punctuation marks: a dependency-free approximation (≈ 1 token per word/symbol)."""

    name = "regex"

    def count(self, text: str) -> int:
        return len(_REGEX_TOKEN.findall(text))


class HFTokenCounter:
    """Counts with any Hugging Face tokenizer; special-token strings in the text count as plain text."""

    def __init__(self, tokenizer: object, name: str = "hf") -> None:
        self._tok = tokenizer
        self.name = name

    def count(self, text: str) -> int:
        if not text:
            return 0
        # split_special_tokens: a literal "<|endoftext|>" in a trace is text, not a control token.
        try:
            ids = self._tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        except TypeError:  # tokenizers without the flag
            ids = self._tok(text, add_special_tokens=False)["input_ids"]
        return len(ids)

    @classmethod
    def from_dir(cls, path: str | Path) -> HFTokenCounter:
        from transformers import AutoTokenizer

        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(
                f"tokenizer directory {p} does not exist; pass --tokenizer DIR of a saved HF tokenizer"
            )
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(p))
        except Exception as exc:  # noqa: BLE001 - transformers raises many types for a bad folder
            raise ValueError(
                f"--tokenizer {p}: cannot load a Hugging Face tokenizer from it ({exc})"
            ) from None
        return cls(tokenizer, name=f"hf:{p.name}")


def default_token_counter() -> TokenCounter:
    """The built-in default: words and symbols, about 3 characters per token on real traces, close to
    the cl100k units the paper's 200-token minimum is stated in (the toy tokenizer is ~1.4)."""
    return RegexTokenCounter()


def load_token_counter(spec: str | None) -> TokenCounter:
    """`None`/"default" → built-in; "regex" → regex counter; anything else → an HF tokenizer directory."""
    if spec in (None, "", "default"):
        return default_token_counter()
    if spec == "regex":
        return RegexTokenCounter()
    return HFTokenCounter.from_dir(spec)


# ----------------------------------------------------------------------------------------------
# Atomic spans (code and math)


@dataclass(frozen=True)
class Span:
    start: int
    end: int  # exclusive
    kind: str  # "code" | "display_math" | "inline_math" | "inline_code"


_OPENER = re.compile(
    r"(?P<fence>^[ \t]*(?:```|~~~))|(?P<tick3>```)|(?P<dd>\$\$)|(?P<bracket>(?<!\\)\\\[)"
    r"|(?P<paren>(?<!\\)\\\()|(?P<dollar>(?<![\\$])\$)|(?P<tick>`)",
    re.MULTILINE,
)
_BLANK_LINE = re.compile(r"\n[ \t]*\r?\n")
_MAX_INLINE = 600  # an inline `$` pair longer than this is more likely two stray dollars


def find_atomic_spans(text: str) -> list[Span]:
    """Code and math spans, left to right, non-overlapping; unclosed openers are plain text."""
    spans: list[Span] = []
    pos = 0
    n = len(text)
    while pos < n:
        m = _OPENER.search(text, pos)
        if m is None:
            break
        kind = m.lastgroup
        start = m.start()
        end = -1
        if kind == "fence":
            marker = m.group().strip()
            line_end = text.find("\n", m.end())
            if line_end >= 0:
                close = re.compile(rf"^[ \t]*{re.escape(marker)}[^\n]*$", re.MULTILINE).search(
                    text, line_end + 1
                )
                if close:
                    end = close.end()
                    spans.append(Span(start, end, "code"))
            if end < 0:  # unclosed fence: an inline ``` pair on the line, else plain text
                inline = text.find("```", m.end(), line_end if line_end >= 0 else n)
                if inline >= 0:
                    end = inline + 3
                    spans.append(Span(start, end, "inline_code"))
        elif kind == "tick3":
            line_end = text.find("\n", m.end())
            close = text.find("```", m.end(), line_end if line_end >= 0 else n)
            if close >= 0:
                end = close + 3
                spans.append(Span(start, end, "inline_code"))
        elif kind == "dd":
            close = text.find("$$", m.end())
            if close >= 0:
                end = close + 2
                spans.append(Span(start, end, "display_math"))
        elif kind in ("bracket", "paren"):
            closer = r"\]" if kind == "bracket" else r"\)"
            close = _find_unescaped(text, closer, m.end())
            if close >= 0:
                end = close + 2
                spans.append(Span(start, end, "display_math" if kind == "bracket" else "inline_math"))
        elif kind == "dollar":
            close = _find_inline_dollar_close(text, m.end())
            if close >= 0:
                end = close + 1
                spans.append(Span(start, end, "inline_math"))
        elif kind == "tick":
            line_end = text.find("\n", m.end())
            close = text.find("`", m.end(), line_end if line_end >= 0 else n)
            if close > m.end():
                end = close + 1
                spans.append(Span(start, end, "inline_code"))
        pos = end if end > start else m.end()
    return spans


def _find_unescaped(text: str, closer: str, pos: int) -> int:
    i = text.find(closer, pos)
    while i >= 0 and i > 0 and text[i - 1] == "\\":
        i = text.find(closer, i + 1)
    return i


def _find_inline_dollar_close(text: str, pos: int) -> int:
    """Closing `$` of an inline formula: same paragraph, not escaped, not `$$`, bounded length."""
    i = pos
    limit = min(len(text), pos + _MAX_INLINE)
    while i < limit:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "$":
            if i == pos or text.startswith("$$", i):
                return -1
            return i
        if c == "\n" and _BLANK_LINE.match(text, i):
            return -1
        i += 1
    return -1


_MASK = "\x01"


def mask_spans(text: str, spans: Sequence[Span]) -> str:
    """Same length as `text`, with every atomic span replaced by an inert character."""
    if not spans:
        return text
    out: list[str] = []
    prev = 0
    for s in spans:
        out.append(text[prev : s.start])
        out.append(_MASK * (s.end - s.start))
        prev = s.end
    out.append(text[prev:])
    return "".join(out)


# ----------------------------------------------------------------------------------------------
# Cutting

_ABBREV = {
    "e.g.",
    "i.e.",
    "etc.",
    "vs.",
    "dr.",
    "mr.",
    "mrs.",
    "ms.",
    "prof.",
    "sr.",
    "jr.",
    "fig.",
    "eq.",
    "eqs.",
    "approx.",
    "no.",
    "cf.",
    "resp.",
    "st.",
    "p.",
    "pp.",
}
# A sentence end: terminal punctuation (plus closing quotes/brackets), then whitespace, then a
# character that can start a sentence (not a lowercase letter or a continuing punctuation mark).
_SENT_END = re.compile(r"[.!?]+[\"')\]]*(?P<ws>[ \t]*(?:\r?\n[ \t]*)*)(?=[^\s\-a-z,;:.!?)\]}])")
_PARA = re.compile(r"\r?\n[ \t]*\r?\n\s*")
_LINE = re.compile(r"\r?\n[ \t]*")
_LIST_START = re.compile(r"(?:[-*+•]\s|\d{1,3}[.)]\s|#{1,6}\s|\*\*|>\s)")


def _cut_points(text: str, masked: str, spans: Sequence[Span]) -> list[int]:
    cuts: set[int] = set()
    for m in _PARA.finditer(masked):
        cuts.add(m.end())
    for m in _SENT_END.finditer(masked):
        ws = m.group("ws")
        if not ws:
            continue  # "x.Y": no whitespace, not a sentence end
        punct_end = m.start("ws")
        if _is_false_end(masked, m.start(), punct_end):
            continue
        cuts.add(m.end())
    for m in _LINE.finditer(masked):
        nl = m.start()
        line_start = masked.rfind("\n", 0, nl) + 1
        prev_line = masked[line_start:nl].rstrip()
        nxt = masked[m.end() : m.end() + 8]
        if not prev_line or not nxt or nxt[0] in "\r\n":
            continue
        if prev_line[-1] in ".!?:" or _LIST_START.match(nxt) or (prev_line[-1] == _MASK and nxt[0] == _MASK):
            cuts.add(m.end())
    # Edges of display blocks that sit on their own lines.
    for s in spans:
        if s.kind not in ("code", "display_math"):
            continue
        before = text[: s.start]
        line_prefix = before[before.rfind("\n") + 1 :]
        if s.start > 0 and not line_prefix.strip() and before.rstrip(" \t").endswith("\n"):
            cuts.add(s.start - len(line_prefix))
        after = re.match(r"[ \t]*\r?\n[ \t]*", text[s.end :])
        if after:
            cuts.add(s.end + after.end())
    return sorted(c for c in cuts if 0 < c < len(text) and not _inside_span(c, spans))


def _inside_span(pos: int, spans: Sequence[Span]) -> bool:
    return any(s.start < pos < s.end for s in spans)


def _is_false_end(masked: str, start: int, punct_end: int) -> bool:
    """Abbreviations, list markers like "1." at a line start, and single initials are not ends."""
    if masked[start] != ".":
        return False
    if masked.startswith("...", start) or masked[start:punct_end].startswith(".."):
        return False
    word_start = start
    while word_start > 0 and not masked[word_start - 1].isspace():
        word_start -= 1
    token = masked[word_start:punct_end].lower().strip("\"'([")
    if token in _ABBREV or re.fullmatch(r"(?:[a-z]\.){2,}", token):
        return True
    line_start = masked.rfind("\n", 0, start) + 1
    if re.fullmatch(r"[ \t]*(?:\d{1,3}|[a-zA-Z]|[ivx]{1,4})", masked[line_start:start]):
        return True  # "1. " / "a. " list marker at the start of a line
    return bool(re.fullmatch(r"[A-Z]", masked[word_start:start]) and start - word_start == 1)


# ----------------------------------------------------------------------------------------------
# Merging


@dataclass(frozen=True)
class SplitConfig:
    """Knobs of the splitter; the defaults follow the original's intent (min 5 tokens, 30-word math runs)."""

    min_tokens: int = 5
    max_math_run_words: int = 30
    max_merge_tokens: int = 600  # merge rules never grow a sentence past this (atomic units may)

    def __post_init__(self) -> None:
        if self.min_tokens < 0 or self.max_math_run_words < 0 or self.max_merge_tokens < 1:
            raise ValueError(f"invalid SplitConfig: {self}")


_CONTINUATION = re.compile(
    r"(?:therefore|thus|hence|so|then|substituting|plugging|simplifying|which|where|giving|yielding)\b",
    re.IGNORECASE,
)
_OPERATOR_START = re.compile(
    r"(?:=|\+|-(?!-)|\*|/|\\(?:Rightarrow|implies|to|cdot|times|le|ge|leq|geq)\b|⇒|→|≤|≥|<|>)"
)
_INCOMPLETE_END = re.compile(r"(?:=|\+|-|\*|/|\\cdot|\\times|⇒|→|,|\(|\\Rightarrow|\\implies)$")
_MATH_CHARS = re.compile(r"[=^_\\<>≤≥⇒→±×÷√∑∫]")


@dataclass
class _Piece:
    text: str
    masked: str
    tokens: int
    math: bool  # contains a math span or equation characters
    math_only: bool  # nothing but math/code (and whitespace/punctuation)


def _make_piece(text: str, masked: str, counter: TokenCounter) -> _Piece:
    plain = masked.replace(_MASK, "")
    has_span = _MASK in masked
    math = has_span or bool(_MATH_CHARS.search(plain))
    math_only = (
        has_span
        and not re.search(r"[A-Za-z]{2,}", plain)
        or (
            not has_span
            and len(plain.split()) <= 12
            and bool(re.search(r"=", plain))
            and not re.search(r"[A-Za-z]{4,}", plain)
        )
    )
    return _Piece(text, masked, counter.count(text), math, math_only)


def _join(a: _Piece, b: _Piece) -> _Piece:
    return _Piece(
        a.text + b.text,
        a.masked + b.masked,
        a.tokens + b.tokens,
        a.math or b.math,
        a.math_only and b.math_only,
    )


def _words(s: str) -> int:
    return len(s.split())


def _should_merge(cur: _Piece, nxt: _Piece, cfg: SplitConfig) -> bool:
    if cur.tokens + nxt.tokens > cfg.max_merge_tokens:
        return False
    cur_s = cur.masked.rstrip()
    nxt_s = nxt.masked.lstrip()
    if not cur_s or not nxt_s:
        return True
    if nxt_s[0] in ":;)]},.":
        return True  # leading punctuation belongs to what came before
    if cur_s.endswith(":"):
        return True  # "We have:" + the thing we have
    if _INCOMPLETE_END.search(cur_s):
        return True  # the derivation continues on the next line
    if nxt_s[0].islower() and nxt_s[0].isalpha():
        return True  # a lowercase start continues the sentence (e.g. after display math)
    if cur.math and nxt.math and (_OPERATOR_START.match(nxt_s) or _CONTINUATION.match(nxt_s)):
        return True  # "… = 5" + "so x = 3": one derivation
    if cur.math and nxt_s[0] == _MASK and nxt.math_only:
        return True  # a display equation continues the sentence that introduced it
    last_line = cur_s.rsplit("\n", 1)[-1]
    if (
        cur.math_only
        and nxt.math_only
        and _words(last_line) <= cfg.max_math_run_words
        and _words(nxt_s) <= cfg.max_math_run_words
    ):
        return True  # consecutive short math lines form one unit
    return False


def _merge_pass(pieces: list[_Piece], rule: Callable[[_Piece, _Piece], bool]) -> list[_Piece]:
    out: list[_Piece] = []
    for p in pieces:
        if out and rule(out[-1], p):
            out[-1] = _join(out[-1], p)
        else:
            out.append(p)
    return out


def split_sentences(
    text: str, counter: TokenCounter | None = None, config: SplitConfig | None = None
) -> list[str]:
    """Cut `text` into sentence units; ``"".join(result) == text`` always holds."""
    if not text:
        return []
    cfg = config or SplitConfig()
    counter = counter or RegexTokenCounter()
    spans = find_atomic_spans(text)
    masked = mask_spans(text, spans)
    cuts = [0, *_cut_points(text, masked, spans), len(text)]
    pieces = [
        _make_piece(text[a:b], masked[a:b], counter) for a, b in zip(cuts, cuts[1:], strict=False) if b > a
    ]
    pieces = _merge_pass(pieces, lambda a, b: _should_merge(a, b, cfg))
    # Short fragments join their predecessor (the first one joins its successor).
    merged: list[_Piece] = []
    for p in pieces:
        short = p.tokens < cfg.min_tokens or not p.text.strip()
        if merged and (short or not merged[-1].text.strip()):
            merged[-1] = _join(merged[-1], p)
        else:
            merged.append(p)
    if len(merged) > 1 and (merged[0].tokens < cfg.min_tokens or not merged[0].text.strip()):
        merged[1] = _join(merged[0], merged[1])
        merged.pop(0)
    result = [p.text for p in merged]
    assert "".join(result) == text  # the one invariant everything downstream relies on
    return result


def sentence_token_counts(sentences: Sequence[str], counter: TokenCounter) -> list[int]:
    return [counter.count(s) for s in sentences]
