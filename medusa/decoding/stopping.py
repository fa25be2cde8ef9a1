"""Where a request's output stops: EOS ids, token-id stop sequences. Pure functions over lists
of token ids, shared by the single-request generator and the batched engine; knows nothing of
text, tensors or scheduling."""
from __future__ import annotations


def stop_cut(ids: list[int], new_from: int, eos: set[int], stops) -> tuple[int, str] | None:
    """Where to cut `ids` (exclusive) and why ("eos" | "stop"), looking only at tokens from
    index new_from on (earlier tokens were checked already). `stops` is a sequence of token-id
    sequences; a stop sequence may start before new_from."""
    for i in range(new_from, len(ids)):
        if ids[i] in eos:
            return i + 1, "eos"
        for s in stops:
            n = len(s)
            if n and i + 1 >= n and ids[i + 1 - n: i + 1] == list(s):
                return i + 1, "stop"
    return None
