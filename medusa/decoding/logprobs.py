"""Per-token log-probabilities of emitted tokens under the base model, exact under speculation.

The distribution reported for an emitted token is the raw base distribution at its position:
log_softmax of the base model's logits, before temperature, top-k or top-p (what vLLM returns
by default). Under tree verification the base logits of every tree node are at hand: the token
emitted at index d of a step's accepted path was predicted by node path[d] (its parent on the
path; the bonus token's is the last accepted node), so the logits of that node give exactly the
distribution plain decoding would have had at that position. A prompt's first token comes from
the prefill's last logits (a path of the one root position).

Work happens only for steps where some row asked (the step's graph key says so, runner.py):
the [B, D+1, V] rows of the path are gathered, turned into float32 log-probabilities, reduced
to the emitted token's value and the top TOP_COMPUTED alternatives, and dropped; nothing of size V
outlives the call. Pure functions over tensors."""
from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_TOP = 5  # most alternatives a request may ask for (OpenAI's API allows 20; we cap at 5)
# alternatives a step computes: beam search (beam.py) needs each beam's best max(2, 1 + #EOS) * K
# continuations, so K = 8 beams with one EOS id fit; a topk of 16 costs what one of 5 does
TOP_COMPUTED = 16


@dataclass(frozen=True)
class TokenLogprob:
    """An emitted token's log-probability under the base model's raw distribution at its
    position, and the request's top-k alternatives there (best first; may include the token)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob)


@dataclass(frozen=True)
class PathLogprobs:
    """Log-probabilities along each row's emitted tokens (entries past a row's emitted count are padding)."""

    token: torch.Tensor  # [B, D+1] float32: logprob of the emitted token at index d
    top_ids: torch.Tensor  # [B, D+1, TOP_COMPUTED] long: the most likely tokens there, best first
    top_lp: torch.Tensor  # [B, D+1, TOP_COMPUTED] float32: their logprobs


def path_logprobs(logits: torch.Tensor, path: torch.Tensor, tokens: torch.Tensor) -> PathLogprobs:
    """logits [B, N, V] of every node; path [B, D+1] node ids (-1 padded): the node whose logits
    predicted the token emitted at each index; tokens [B, D+1] the emitted tokens (-1 padded)."""
    V = logits.shape[-1]
    rows = logits.gather(1, path.clamp_min(0)[..., None].expand(-1, -1, V))  # [B, D+1, V]
    lp = torch.log_softmax(rows.float(), dim=-1)
    del rows
    token = lp.gather(-1, tokens.clamp_min(0)[..., None]).squeeze(-1)  # [B, D+1]
    top_lp, top_ids = lp.topk(min(TOP_COMPUTED, V), dim=-1)  # sorted, best first
    return PathLogprobs(token, top_ids, top_lp)


def host_entries(lp: PathLogprobs, tokens: list[list[int]], want: list[int | None]) -> list[list[TokenLogprob] | None]:
    """Per row i < len(tokens): a TokenLogprob for each of its emitted tokens[i] (the first
    len(tokens[i]) path entries) with want[i] alternatives, or None where want[i] is None.
    One device -> host copy for the batch."""
    n = len(tokens)
    tok, ids, top = lp.token[:n].tolist(), lp.top_ids[:n].tolist(), lp.top_lp[:n].tolist()
    out: list[list[TokenLogprob] | None] = []
    for i, row in enumerate(tokens):
        k = want[i]
        out.append(None if k is None else [
            TokenLogprob(t, tok[i][d], tuple(zip(ids[i][d][:k], top[i][d][:k]))) for d, t in enumerate(row)])
    return out
