"""Prompt lookup (medusa.decoding.lookup): what a tree's lookup chain proposes."""
import random

import pytest

from medusa.decoding.lookup import NgramLookup


def brute(tokens: list[int], length: int, max_n: int = 3, min_n: int = 1) -> list[int]:
    """The definition: the longest suffix (max_n .. min_n tokens) that occurred earlier, and the
    tokens after its latest earlier occurrence."""
    T = len(tokens)
    for n in range(min(max_n, T - 1), min_n - 1, -1):
        for i in range(T - n - 1, -1, -1):
            if tokens[i:i + n] == tokens[T - n:]:
                return tokens[i + n:i + n + length]
    return []


def test_latest_occurrence_of_the_longest_suffix():
    lk = NgramLookup([5, 1, 2, 3, 9, 9, 1, 2, 3, 7, 1, 2, 3])
    assert lk.propose(2) == [7, 1]  # "1 2 3" occurred twice before; the later one was followed by 7
    lk = NgramLookup([4, 2, 3, 8, 1, 2, 3, 6, 0, 3])
    assert lk.propose(3) == [6, 0, 3]  # only the last token matches earlier ("3" last followed at 7)


def test_no_match_and_no_self_match():
    assert NgramLookup([1, 2, 3]).propose(4) == []
    assert NgramLookup([]).propose(4) == [] and NgramLookup([7]).propose(4) == []
    assert NgramLookup([1, 2, 3]).draft(4, pad=0) == [0, 0, 0, 0]
    assert NgramLookup([1, 2, 1]).draft(4, pad=0) == [2, 1, 0, 0]  # runs into the sequence's end, padded


def test_growing_sequence_equals_the_definition():
    rng = random.Random(0)
    for _ in range(200):
        seq = [rng.randrange(5) for _ in range(rng.randint(1, 50))]
        lk = NgramLookup(seq[:1], max_n=3, min_n=rng.choice([1, 2]))
        for T in range(1, len(seq) + 1):
            if T > 1:
                lk.extend(seq[T - 1:T])
            assert lk.propose(6) == brute(seq[:T], 6, 3, lk.min_n)


def test_bad_sizes():
    with pytest.raises(ValueError):
        NgramLookup(max_n=1, min_n=2)
