"""Stop strings matched on the detokenised text stream (as vLLM, SGLang and TGI do), not on token
ids: a stop string is found whatever tokens spell it. The matcher holds back only the tail of
the text that could still be the beginning of a stop string, releases the rest at once, and on
a match returns the text before the stop string (the stop string itself is trimmed) and tells
the caller to end the request.

Knows text only; nothing of tokens, engines or the wire."""
from __future__ import annotations


class StopMatcher:
    """push(text) -> (text safe to emit now, matched); flush() -> what was held back at the end."""

    def __init__(self, stops: list[str] | tuple[str, ...] = ()):
        self.stops = tuple(s for s in stops if s)
        self._held = ""
        self.matched: str | None = None

    def _partial(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best

    def push(self, text: str) -> tuple[str, bool]:
        if self.matched is not None:
            return "", True
        if not self.stops:
            return text, False
        buf = self._held + text
        hits = [(i, s) for s in self.stops if (i := buf.find(s)) >= 0]
        if hits:
            i, s = min(hits)  # the earliest stop string in the text wins
            self.matched, self._held = s, ""
            return buf[:i], True
        keep = self._partial(buf)
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep], False

    def flush(self) -> str:
        """The held-back text once the stream ended without completing a stop string."""
        out, self._held = self._held, ""
        return "" if self.matched is not None else out
