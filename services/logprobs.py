"""Per-token log-probabilities on their way out of the ingress: each token's entry follows its
text through the stop-string matcher (services.stops). An entry leaves with the delta that
releases the last character its token added; while that text is held back (it may begin a stop
string) the entry waits too; when a stop string matches, the tokens whose text survives (at
least one character before the cut) keep their entries, the rest are dropped with the trimmed
text. A token that adds no text yet (an incomplete UTF-8 character) leaves with the text around it.

Also the engine event <-> wire translation: the engine replica sends, per token, [logprob,
[[token id, logprob], ...]]; the ingress turns them into medusa.v1 TokenLogprob messages with
the tokenizer's per-token text and the token's offset in the generated text.

Knows text offsets and the wire messages; nothing of engines, tokenizers or HTTP."""
from __future__ import annotations

from collections import deque

from medusa.proto.v1 import medusa_pb2 as pb

MAX_TOP = 5  # alternatives per token: medusa.decoding.logprobs.MAX_TOP (not imported: the ingress runs without torch)


def to_event(logprobs) -> list:
    """Engine TokenLogprobs -> the replica's plain-list form [[logprob, [[id, logprob], ...]], ...]."""
    return [[e.logprob, [[t, v] for t, v in e.top]] for e in logprobs]


def entries(token_ids: list[int], event: list, texts: dict[int, str]) -> list[pb.TokenLogprob]:
    """Wire messages for tokens `token_ids` with their replica entries; texts: id -> token text."""
    out = []
    for tid, (lp, top) in zip(token_ids, event):
        alts = [pb.TokenLogprob(token_id=t, token=texts[t], logprob=v) for t, v in top]
        out.append(pb.TokenLogprob(token_id=tid, token=texts[tid], logprob=lp, top_logprobs=alts))
    return out


def ids_of(token_ids: list[int], event: list) -> set[int]:
    """Every token id whose text the entries need (the tokens and their alternatives)."""
    return set(token_ids) | {t for _, top in event for t, _ in top}


class LogprobStream:
    """add(entry, chars) as each token's stream text goes into the stop matcher; release(chars,
    ...) after each push with the number of characters the matcher let out."""

    def __init__(self):
        self._pending: deque = deque()  # (start, end, entry): the token's characters in the produced text
        self._produced = 0  # characters pushed into the matcher so far
        self._released = 0  # characters it let out

    def add(self, entry: pb.TokenLogprob, chars: int) -> None:
        entry.text_offset = self._produced
        self._pending.append((self._produced, self._produced + chars, entry))
        self._produced += chars

    def release(self, chars: int, matched: bool = False, final: bool = False) -> list[pb.TokenLogprob]:
        """Entries whose text is now out. matched: a stop string cut the text here (entries of
        tokens with text before the cut leave, the others are dropped); final: the stream ended
        without a match (everything left leaves)."""
        self._released += chars
        out = []
        while self._pending:
            start, end, entry = self._pending[0]
            if end <= self._released or (matched and start < self._released) or (final and not matched):
                out.append(entry)
                self._pending.popleft()
            else:
                break
        if matched:
            self._pending.clear()
        return out
