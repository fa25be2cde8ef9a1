"""Prompt lookup: draft tokens copied from the sequence itself.

Answers repeat their prompt and themselves (names, code, quoted text, list formats). At each
step the tokens that followed the latest earlier occurrence of the sequence's last n tokens
(n from `max_n` down to `min_n`) are a guess at what comes next; a tree's lookup chain
(`Tree.lookup`) carries them beside the heads' guesses, and verification keeps whichever
branch the base model agrees with further. No model runs here: it is a dictionary of n-grams
on the host, updated with each step's new tokens.

Pure Python over token ids; knows nothing of tensors, models or trees."""
from __future__ import annotations

from typing import Iterable

MAX_N, MIN_N = 3, 1


class NgramLookup:
    """The n-grams of one growing sequence, each mapped to where its latest occurrence is
    followed (the index of the next token). An occurrence is indexed only once a token follows
    it, so the sequence's own last n-gram never matches itself."""

    def __init__(self, tokens: Iterable[int] = (), max_n: int = MAX_N, min_n: int = MIN_N):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"n-gram sizes need 1 <= min_n <= max_n, got {min_n}, {max_n}")
        self.max_n, self.min_n = max_n, min_n
        self.tokens: list[int] = []
        self._next: dict[tuple[int, ...], int] = {}
        self._indexed = 0  # followed positions indexed so far: 1 .. _indexed-1 (as ends of n-grams)
        self.extend(tokens)

    def extend(self, tokens: Iterable[int]) -> None:
        self.tokens.extend(tokens)

    def _index(self) -> None:
        t, nxt = self.tokens, self._next
        for i in range(max(self._indexed, 1), len(t)):  # i: the token that follows the n-grams ending at i-1
            for n in range(self.min_n, min(self.max_n, i) + 1):
                nxt[tuple(t[i - n:i])] = i
        self._indexed = max(len(t), 1)

    def propose(self, length: int) -> list[int]:
        """Up to `length` tokens that followed the latest earlier occurrence of the longest
        matching suffix ([] when none of its last min_n .. max_n tokens occurred before)."""
        self._index()
        t, T = self.tokens, len(self.tokens)
        for n in range(min(self.max_n, T), self.min_n - 1, -1):
            i = self._next.get(tuple(t[T - n:]))
            if i is not None:
                return t[i:i + length]
        return []

    def draft(self, length: int, pad: int = 0) -> list[int]:
        """propose(length) padded to exactly `length` tokens with `pad` (a padded node is
        verified like any other: it costs a slot, never correctness)."""
        got = self.propose(length)
        return got + [pad] * (length - len(got))
