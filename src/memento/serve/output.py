"""One choice's output as it grows, token by token: incremental text, the reasoning / answer split,
stop strings, and log-prob entries.

A streamed response and a non-streamed one are built from the same deltas (the non-streamed text
is their concatenation), so the two can never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass, field

REPLACEMENT = "\ufffd"  # what a decoder gives for an incomplete UTF-8 sequence
MIN_LOGPROB = -9999.0  # JSON has no -inf; OpenAI and vLLM report this floor instead


class Detokenizer:
    """Text of a growing token list, one delta at a time. Decodes a short window (the tokens since
    the last emitted boundary) so the cost per token stays constant, and holds back text while it
    ends in an incomplete UTF-8 sequence."""

    def __init__(self, tokenizer, skip_special_tokens: bool) -> None:
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # window start
        self.read = 0  # tokens before this one are emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith(REPLACEMENT):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """Whatever is held back (at the end of the output)."""
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return after[len(before) :] if len(after) > len(before) else ""


# (token text, logprob, [(alternative token text, logprob)]): texts decoded with markers visible
LogprobEntry = tuple[str, float, list[tuple[str, float]]]


@dataclass
class Delta:
    """What one step added to a choice."""

    reasoning: str = ""
    content: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[LogprobEntry] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    stop_now: bool = False  # a stop string matched: the engine must drop the request


class _Segment:
    """One text field (reasoning or content): deltas pass through a hold-back buffer as long as
    the last characters could still be the start of a stop string."""

    def __init__(self, detok: Detokenizer, stops: list[str]) -> None:
        self.detok = detok
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.strip = False  # drop leading newlines (set when the field opens with a think tag)
        self.pending = ""
        self.text = ""  # emitted so far

    def feed(self, piece: str, final: bool) -> tuple[str, str | None]:
        """Add decoded text; return (text to emit now, the stop string that matched or None). Held
        text is the last `hold` characters, so a stop string always lies within `pending`."""
        self.pending += piece
        if self.strip and not self.text:
            self.pending = self.pending.lstrip("\n")
        hits = [(self.pending.find(s), s) for s in self.stops if s in self.pending]
        if hits:
            at, stop = min(hits)
            out, self.pending = self.pending[:at], ""
            self.text += out
            return out, stop
        if final or not self.hold:
            out, self.pending = self.pending, ""
        else:
            out = self.pending[: max(0, len(self.pending) - self.hold)]
            self.pending = self.pending[len(out) :]
        self.text += out
        return out, None


class ChoiceOutput:
    """The output of one choice: feed it every token the engine gives that request.

    `think` = (`<think>` id, `</think>` id) turns on the reasoning split: tokens between them go to
    `reasoning` (starting inside it when the prompt left a `<think>` open), the rest to `content`;
    the two think tags themselves appear in neither, and the newlines right after a think tag are
    dropped.
    `stop_ids`: tokens that end the output without being part of it (EOS, `<|im_end|>`, the
    request's stop_token_ids); ending on one of `user_stop_ids` sets `stop_reason` to that id.
    """

    def __init__(
        self,
        index: int,
        tokenizer,
        *,
        skip_special_tokens: bool = True,
        stop: list[str] | None = None,
        stop_ids: set[int] | frozenset[int] = frozenset(),
        user_stop_ids: set[int] | frozenset[int] = frozenset(),
        think: tuple[int, int] | None = None,
        in_reasoning: bool = False,
        logprobs: bool = False,
    ) -> None:
        self.index = index
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.stops = list(stop or [])
        self.stop_ids = set(stop_ids) | set(user_stop_ids)
        self.user_stop_ids = set(user_stop_ids)
        self.think = think
        self.split = think is not None
        self.state = "reasoning" if (self.split and in_reasoning) else "content"
        self.entered_reasoning = self.state == "reasoning"
        self.want_logprobs = logprobs
        self.token_ids: list[int] = []
        self._pieces: dict[int, str] = {}
        self.logprobs: list[LogprobEntry] = []
        self.segments = {"content": self._segment(), "reasoning": self._segment()}
        self.segments["reasoning"].strip = True
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None

    def _segment(self) -> _Segment:
        return _Segment(Detokenizer(self.tokenizer, self.skip), self.stops)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def content(self) -> str:
        return self.segments["content"].text

    @property
    def reasoning(self) -> str | None:
        return self.segments["reasoning"].text if self.entered_reasoning else None

    def feed(
        self,
        token: int,
        logprob: float | None,
        top: list[tuple[int, float]] | None,
        engine_finish: str | None,
    ) -> Delta:
        """One token from the engine (`engine_finish`: the engine's finish reason, if it ended)."""
        delta = Delta()
        if self.finished:
            return delta
        self.token_ids.append(token)
        delta.token_ids.append(token)
        if self.want_logprobs and logprob is not None:
            entry = (self._piece(token), logprob, [(self._piece(t), lp) for t, lp in top or []])
            self.logprobs.append(entry)
            delta.logprobs.append(entry)
        ends_with_stop_token = engine_finish == "stop" and token in self.stop_ids
        if not ends_with_stop_token:
            if self.split and self.state == "content" and token == self.think[0] and not self.content:
                self._switch("reasoning", delta)
            elif self.split and self.state == "reasoning" and token == self.think[1]:
                self._switch("content", delta)
            else:
                seg = self.segments[self.state]
                self._emit(delta, seg.feed(seg.detok.add(token), final=False))
        if delta.finish_reason is None and engine_finish is not None:
            seg = self.segments[self.state]
            self._emit(delta, seg.feed(seg.detok.flush(), final=True))
            if delta.finish_reason is None:
                self._finish(delta, "stop" if engine_finish == "stop" else "length")
                if ends_with_stop_token and token in self.user_stop_ids:
                    delta.stop_reason = self.stop_reason = token
        return delta

    def _piece(self, token: int) -> str:
        """A token's own text (markers visible), as log-prob entries name it."""
        text = self._pieces.get(token)
        if text is None:
            text = self._pieces[token] = self.tokenizer.decode([token], skip_special_tokens=False)
        return text

    def close(self, engine_finish: str) -> Delta:
        """The engine ended the request without a new token (cut at the KV budget)."""
        delta = Delta()
        if not self.finished:
            seg = self.segments[self.state]
            self._emit(delta, seg.feed(seg.detok.flush(), final=True))
            if delta.finish_reason is None:
                self._finish(delta, "stop" if engine_finish == "stop" else "length")
        return delta

    def _switch(self, state: str, delta: Delta) -> None:
        old = self.segments[self.state]
        self._emit(delta, old.feed(old.detok.flush(), final=True))
        if delta.finish_reason is None:
            self.state = state
            self.entered_reasoning |= state == "reasoning"
            self.segments[state].strip = True

    def _emit(self, delta: Delta, result: tuple[str, str | None]) -> None:
        text, stop = result
        if self.state == "reasoning":
            delta.reasoning += text
        else:
            delta.content += text
        if stop is not None:
            self._finish(delta, "stop")
            delta.stop_reason = self.stop_reason = stop
            delta.stop_now = True

    def _finish(self, delta: Delta, reason: str) -> None:
        delta.finish_reason = self.finish_reason = reason

    def abort(self) -> None:
        """The client went away: nothing more is emitted."""
        self.finish_reason = self.finish_reason or "abort"
