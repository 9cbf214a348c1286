"""Token ids to text as they arrive: incremental detokenization with stop strings.

Text is released only once it cannot change: a trailing U+FFFD (a multi-byte character cut by a
token boundary) waits for its next token, and with stop strings the last len(longest stop) - 1
characters wait until it is clear they do not begin a stop string (OpenAI never sends a stop
string, not even its first characters).
"""

from __future__ import annotations

from typing import Sequence


class TextAssembler:
    """Feed generated ids with add(); it returns the text now safe to send. After stopped, stop."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self._tokenizer = tokenizer
        self._stop = tuple(s for s in stop if s)
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self._ids: list[int] = []
        self._sent = 0
        self.stopped = False  # a stop string was found; the text ends before it
        self.num_tokens = 0  # tokens consumed, up to the one that completed a stop string

    def _text(self) -> str:
        return self._tokenizer.decode(self._ids, skip_special_tokens=True)

    def add(self, ids: Sequence[int]) -> str:
        if self.stopped or not ids:
            return ""
        self._ids.extend(ids)
        self.num_tokens += len(ids)
        text = self._text()
        if self._stop:
            search_from = max(0, self._sent - self._hold)
            hits = [i for i in (text.find(s, search_from) for s in self._stop) if i >= 0]
            if hits:
                self.stopped = True
                return self._release(text, min(hits))
        end = len(text) - self._hold
        if text.endswith("\ufffd"):
            end = min(end, len(text.rstrip("\ufffd")))
        return self._release(text, end)

    def finish(self) -> str:
        """Everything not yet sent (the request ended)."""
        return "" if self.stopped else self._release(self._text(), None)

    def _release(self, text: str, end) -> str:
        end = len(text) if end is None else end
        if end <= self._sent:
            return ""
        piece = text[self._sent:end]
        self._sent = end
        return piece
