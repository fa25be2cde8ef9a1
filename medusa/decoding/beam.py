"""Beam search scoring, as Hugging Face transformers' `generate(num_beams=K, do_sample=False)`
defines it (transformers 5.x `_beam_search`), and its speculative form over verified paths.

One beam step (`BeamSearch.step`), for a single sequence with K running beams:
  - every running beam's log-softmax over the vocabulary (float32) plus the beam's running
    score; the best `keep` = max(2, 1 + #EOS ids) * K continuations over all beams, best first
    (only each beam's own best `keep` tokens can be among them, so that is all a step needs);
  - a continuation "hits" when its token is an EOS id or it reaches max_new_tokens;
  - the next running beams: the first K continuations that do not hit;
  - finished hypotheses: each hitting continuation ranked among the first K enters with score
    running / generated_len ** length_penalty (generated_len counts the new token, EOS
    included), and the best K finished are kept;
  - early stopping (HF's heuristic, also for early_stopping=True): once K hypotheses are
    finished, stop when the best running score / L ** length_penalty cannot beat the worst
    finished one, L = max_new_tokens for early_stopping="never" with a positive length penalty,
    else the current generated length; early_stopping=True also stops as soon as K are finished;
    and the search stops when every continuation hits (max_new_tokens).
The very first step expands the prompt's one distribution (HF starts beams 1..K-1 at -1e9, so
its first top-k takes beam 0's tokens only). Scores are float32 sums, as HF's.

Speculative beam search (`advance`): a verification step gives each running beam its verified
greedy path (the tokens plain greedy decoding would emit from that beam, e[0..m]) and the base
model's distribution at every position of it (depth 0..m). Beam steps run on those
distributions one by one, exactly as plain beam search would, while every running beam's next
distribution is known: after a step, the search goes on only if each new beam is the greedy
child (token e[s]) of a beam whose path is verified one position deeper. Then the new beams are
those K greedy children (a permutation of the old beams, as each parent has one greedy child),
and their next distributions are the paths' next ones. As soon as some new beam is not such a
child (another token, or its parent's path ends), the verification step ends there: the next
one starts from the new beams. Every beam step therefore sees exactly the distributions plain
beam search sees, and the output is the same, up to floating point: a position's logits
computed inside a tree forward can differ from a one-token forward in the last bits (as for
greedy speculative decoding), which can move a score by ~1e-6 and, on an exact near-tie, flip
an order. At least one beam step runs per verification, so it is never slower in steps than
plain beam search; it gains when all K beams follow their greedy paths (beams agreeing with
greedy decoding, e.g. long deterministic spans).

Pure host-side Python over token ids and floats (scores in float32 through torch scalars);
knows nothing of models, rows or engines (engine/beams.py drives it)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from medusa.errors import RequestError

EARLY_STOPPING = (True, False, "never")


@dataclass(frozen=True)
class BeamParams:
    beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False  # True | False | "never" (HF's meanings)
    num_return: int = 1  # finished hypotheses returned, best first (<= beams)


def keep_of(beams: int, n_eos: int) -> int:
    """Continuations a beam step keeps (HF's beams_to_keep): enough that K stay running when
    the best K all end."""
    return max(2, 1 + n_eos) * beams


def check_params(p: BeamParams, n_eos: int, max_top: int) -> None:
    """A RequestError naming what is wrong with p; max_top: continuations a step reports per beam."""
    if isinstance(p.beams, bool) or not isinstance(p.beams, int) or p.beams < 1:
        raise RequestError(f"beams must be an integer >= 1, got {p.beams!r}")
    if keep_of(p.beams, n_eos) > max_top:
        most = max_top // max(2, 1 + n_eos)
        raise RequestError(f"beams must be at most {most} (with {n_eos} stop token ids), got {p.beams}")
    if isinstance(p.length_penalty, bool) or not isinstance(p.length_penalty, (int, float)) \
            or p.length_penalty != p.length_penalty or abs(p.length_penalty) == float("inf"):
        raise RequestError(f"length_penalty must be a finite number, got {p.length_penalty!r}")
    if not any(p.early_stopping is e or (isinstance(e, str) and p.early_stopping == e) for e in EARLY_STOPPING):
        raise RequestError(f"early_stopping must be true, false or \"never\", got {p.early_stopping!r}")
    if isinstance(p.num_return, bool) or not isinstance(p.num_return, int) or not 1 <= p.num_return <= p.beams:
        raise RequestError(f"num_return must be an integer 1..beams ({p.beams}), got {p.num_return!r}")


def parse_early_stopping(v) -> bool | str:
    """A CLI / wire value: "true" / "false" / "never" (any case) or a bool."""
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("true", "1"):
        return True
    if s in ("false", "0", ""):
        return False
    if s == "never":
        return "never"
    raise RequestError(f"early_stopping must be true, false or \"never\", got {v!r}")


@dataclass(frozen=True)
class Hypothesis:
    tokens: tuple[int, ...]  # generated tokens (the final EOS included)
    score: float  # sum of log-probabilities / len(tokens) ** length_penalty


@dataclass(frozen=True)
class Beam:
    tokens: tuple[int, ...]  # generated so far
    score: float  # sum of log-probabilities (a float32 value)


def _f32(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


@dataclass
class BeamSearch:
    """The state of one sequence's beam search (see the module docstring)."""

    params: BeamParams
    max_new_tokens: int
    eos: frozenset
    running: list[Beam] = field(default_factory=lambda: [Beam((), 0.0)])  # one beam before the first step
    finished: list[Hypothesis] = field(default_factory=list)  # best first, at most K
    generated: int = 0
    improvable: bool = True  # HF's is_early_stop_heuristic_unsatisfied
    done: bool = False

    @property
    def keep(self) -> int:
        return keep_of(self.params.beams, len(self.eos))

    def step(self, cands: list[tuple[list[int], list[float]]]) -> list[tuple[int, int]]:
        """One beam step. cands[i]: running beam i's best continuations (token ids, their
        log-probabilities; at least `keep` of them, best first). Returns the new running beams
        as (index of the parent in the old running list, token), best first."""
        if self.done:
            raise RuntimeError("the beam search has ended")
        K, keep, p = self.params.beams, self.keep, self.params
        ids = [c[0][:keep] for c in cands]
        lps = _f32([c[1][:keep] for c in cands])  # [nb, keep]
        scores = _f32([b.score for b in self.running])[:, None] + lps  # [nb, keep] float32, as HF's sum
        top_s, top_i = scores.flatten().topk(min(keep, scores.numel()))
        n = self.generated + 1  # generated length with the new token
        picked = []
        for s, flat in zip(top_s.tolist(), top_i.tolist()):
            i, j = divmod(flat, scores.shape[1])
            tok = ids[i][j]
            picked.append((i, tok, s, tok in self.eos or n >= self.max_new_tokens))
        new_fin = [Hypothesis(self.running[i].tokens + (tok,), (_f32(s) / (n ** p.length_penalty)).item())
                   for i, tok, s, hit in picked[:K] if hit]
        if new_fin:  # the best K of the old and the new ones (old first on ties)
            self.finished = sorted(self.finished + new_fin, key=lambda h: -h.score)[:K]
        nxt = [(i, tok, s) for i, tok, s, hit in picked if not hit][:K]
        self.generated = n
        if len(nxt) < K:  # every continuation hit: max_new_tokens (HF's valid_continuations)
            self.done = True
            self.running = []
            return []
        self.running = [Beam(self.running[i].tokens + (tok,), s) for i, tok, s in nxt]
        full = len(self.finished) >= K
        if full:  # HF's heuristic: with fewer than K finished it always holds
            L = self.max_new_tokens if p.early_stopping == "never" and p.length_penalty > 0.0 else n
            best = _f32(self.running[0].score) / (L ** p.length_penalty)
            self.improvable = self.improvable and bool(best > _f32(self.finished[-1].score))
        self.done = not self.improvable or (full and p.early_stopping is True)
        return [(i, tok) for i, tok, _ in nxt]

    def results(self) -> list[Hypothesis]:
        """The num_return best finished hypotheses, best first."""
        return self.finished[:self.params.num_return]


@dataclass(frozen=True)
class Path:
    """A running beam's verified greedy path: emitted tokens e[0..m] (e[d] is greedy at depth d)
    and the base model's best continuations at each depth (ids[d], lps[d]: at least `keep`)."""

    tokens: list[int]
    ids: list[list[int]]
    lps: list[list[float]]

    @property
    def known(self) -> int:  # depths whose distribution is known (m + 1)
        return min(len(self.ids), len(self.tokens))


def advance(search: BeamSearch, paths: list[Path]) -> tuple[list[tuple[int, int]], int]:
    """Beam steps over one verification step (paths[i]: running beam i's). Returns the new
    running beams as (index of their ancestor among the running beams at the start, token) and
    the beam steps taken S >= 1: a new beam is its ancestor's sequence, then the ancestor's
    path tokens e[0 .. S-2], then its token."""
    origin = list(range(len(search.running)))  # running beam -> its ancestor at the start
    s = 0
    while True:
        new = search.step([(paths[o].ids[s], paths[o].lps[s]) for o in origin])
        s += 1
        out = [(origin[i], tok) for i, tok in new]
        if search.done:
            return out, s
        nxt = [origin[i] for i, tok in new if tok == paths[origin[i]].tokens[s - 1] and s < paths[origin[i]].known]
        if len(nxt) < len(new):  # some new beam's next distribution is unknown: the next step finds it
            return out, s
        origin = nxt


def place(parents: list[int], rows: list[int]) -> tuple[list[int], list[tuple[int, int]]]:
    """Rows for the new beams whose parents live in rows parents[j], among the request's rows:
    each parent's first child stays in the parent's row, the other children take the rows no
    parent is in (whose beams died). Returns (row of each new beam, copies (dst, src)); no copy's
    source is another copy's destination, so the copies may run in any order."""
    taken: set[int] = set()
    out: list[int | None] = []
    for p in parents:
        if p in taken:
            out.append(None)
        else:
            taken.add(p)
            out.append(p)
    free = [r for r in rows if r not in taken]
    copies = []
    for j, p in enumerate(parents):
        if out[j] is None:
            out[j] = free.pop(0)
            copies.append((out[j], p))
    return out, copies
