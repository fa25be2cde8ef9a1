"""Distillation data: prompt files in, token-id records out, and padded training batches.

- Prompt files (text): ShareGPT first turns (JSONL {id, prompt}), Code Alpaca / Alpaca (JSON
  list {instruction, input, output}), GSM8K (JSONL {question, answer}). Mixed round-robin so
  that any prefix of the job list draws from every file.
- Records (ids): one JSONL line per response {id, mode, prompt_ids, response_ids}; appended as
  they finish, so a rerun skips what is done.
- Batches: prompt + response, right-padded, with a mask of the response tokens (the tokens
  the heads learn to guess); deterministic per (seed, epoch), so training can resume mid-epoch.

Knows nothing of tokenizers (text is turned into ids by the caller), models or heads."""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch

from medusa.errors import RequestError


@dataclass(frozen=True)
class PromptText:
    id: str  # "<file stem>:<row id>"
    text: str


@dataclass(frozen=True)
class Record:
    id: str  # "<prompt id>:<mode>"
    mode: str  # "greedy" | "sample"
    prompt_ids: list[int]
    response_ids: list[int]

    def to_json(self) -> str:
        return json.dumps({"id": self.id, "mode": self.mode, "prompt_ids": self.prompt_ids, "response_ids": self.response_ids})


# ------------------------------------------------------------------ prompt files

def _row_text(row) -> str | None:
    if not isinstance(row, dict):
        return None
    if isinstance(row.get("prompt"), str):
        return row["prompt"]
    if isinstance(row.get("question"), str):
        return row["question"]
    if isinstance(row.get("instruction"), str):
        extra = row.get("input") if isinstance(row.get("input"), str) else ""
        return row["instruction"] + ("\n\n" + extra if extra.strip() else "")
    return None


def read_prompt_file(path: str | Path) -> list[PromptText]:
    """One prompt file: a JSON list or JSONL rows of any of the known layouts."""
    path = Path(path)
    if "mt_bench" in path.parts or path.stem.startswith("mt_bench"):
        raise RequestError(f"{path}: MT-Bench is the benchmark, never distillation data")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise RequestError(f"cannot read prompt file {path}: {e}") from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise RequestError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        numbered = list(enumerate(rows, 1))  # (row number, row)
    else:
        numbered = []
        for lineno, line in enumerate(text.splitlines(), 1):  # the file's own line numbers, blank lines counted
            if not line.strip():
                continue
            try:
                numbered.append((lineno, json.loads(line)))
            except json.JSONDecodeError as e:
                raise RequestError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    out = []
    for n, (where, row) in enumerate(numbered):
        t = _row_text(row)
        if t is None:
            raise RequestError(f"{path}:{where}: row has none of prompt, question, instruction")
        if t.strip():
            rid = row.get("id", n) if isinstance(row, dict) else n
            out.append(PromptText(f"{path.stem}:{rid}", t))
    if not out:
        raise RequestError(f"{path} holds no prompts")
    return out


def mix_prompts(files: list[list[PromptText]], seed: int = 0) -> list[PromptText]:
    """Shuffle each file, then interleave them round-robin (ids stay unique)."""
    rng = random.Random(seed)
    shuffled = []
    for rows in files:
        rows = rows[:]
        rng.shuffle(rows)
        shuffled.append(rows)
    out, seen = [], set()
    for i in range(max((len(r) for r in shuffled), default=0)):
        for rows in shuffled:
            if i < len(rows) and rows[i].id not in seen:
                seen.add(rows[i].id)
                out.append(rows[i])
    return out


def sampled_mode(prompt_id: str, sample_fraction: float) -> str:
    """Whether a prompt gets a sampled (vs greedy) response: a stable hash of its id."""
    h = int(hashlib.sha256(prompt_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "sample" if h < sample_fraction else "greedy"


# ------------------------------------------------------------------ records

def read_records(path: str | Path) -> list[Record]:
    path = Path(path)
    if not path.is_file():
        raise RequestError(f"no distilled data at {path}")
    out = []
    lines = path.read_text().splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            out.append(Record(str(r["id"]), str(r.get("mode", "greedy")), [int(t) for t in r["prompt_ids"]],
                              [int(t) for t in r["response_ids"]]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            if n == len(lines):
                continue  # a half-written last line from an interrupted run
            raise RequestError(f"{path}:{n}: not a distillation record") from None
    return out


def done_ids(path: str | Path) -> set[str]:
    path = Path(path)
    if not path.is_file():
        return set()
    ids = set()
    for line in path.read_text().splitlines():
        try:
            ids.add(json.loads(line)["id"])
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return ids


def is_heldout(record_id: str, fraction: float) -> bool:
    """A stable train / held-out split by hash of the record id."""
    h = int(hashlib.sha256(("heldout:" + record_id).encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return h < fraction


def split(records: list[Record], heldout: float) -> tuple[list[Record], list[Record]]:
    train = [r for r in records if r.response_ids and not is_heldout(r.id, heldout)]
    held = [r for r in records if r.response_ids and is_heldout(r.id, heldout)]
    return train, held


def draft_vocab_from(records: list[Record], vocab_size: int, size: int) -> tuple[torch.Tensor, float]:
    """The `size` token ids most frequent among the records' responses (ties: the lower id), in
    id order, and the share of response tokens they cover. What heads restricted to them
    (DraftHeads.set_draft_vocab) can still propose."""
    if not 1 <= size <= vocab_size:
        raise RequestError(f"a draft vocabulary holds 1 to {vocab_size} tokens, not {size}")
    ids = torch.tensor([t for r in records for t in r.response_ids], dtype=torch.long)
    if ids.numel() == 0:
        raise RequestError("no response tokens to count")
    if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
        raise RequestError(f"the records hold token ids outside this model's vocabulary of {vocab_size}")
    counts = torch.bincount(ids, minlength=vocab_size)
    order = torch.argsort(-counts, stable=True)  # by count, ties in id order
    keep = order[:size].sort().values
    return keep, float(counts[keep].sum()) / ids.numel()


# ------------------------------------------------------------------ batches

@dataclass(frozen=True)
class Batch:
    tokens: torch.Tensor  # [B, T] long, right-padded with 0
    target_mask: torch.Tensor  # [B, T] bool: a response token (a token the heads learn to guess)

    @property
    def num_targets(self) -> int:
        return int(self.target_mask.sum())


def collate(records: list[Record], max_len: int) -> Batch:
    seqs = [(r.prompt_ids + r.response_ids)[:max_len] for r in records]
    T = max(len(s) for s in seqs)
    tokens = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.bool)
    for b, (r, s) in enumerate(zip(records, seqs)):
        tokens[b, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[b, len(r.prompt_ids): len(s)] = True
    return Batch(tokens, mask)


def plan_batches(records: list[Record], max_tokens: int, max_len: int, seed: int, epoch: int) -> list[list[int]]:
    """Indices of each batch of an epoch: shuffled, length-sorted within windows (little
    padding), packed to at most max_tokens padded tokens, batch order shuffled. Deterministic."""
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(records)))
    rng.shuffle(order)
    length = lambda i: min(max_len, len(records[i].prompt_ids) + len(records[i].response_ids))  # noqa: E731
    batches: list[list[int]] = []
    window = 512
    for w in range(0, len(order), window):
        cur: list[int] = []
        for i in sorted(order[w: w + window], key=length):
            if cur and (len(cur) + 1) * max(length(i), max(length(j) for j in cur)) > max_tokens:
                batches.append(cur)
                cur = []
            cur.append(i)
        if cur:
            batches.append(cur)
    rng.shuffle(batches)
    return batches


def iterate_batches(records: list[Record], plan: Iterable[list[int]], max_len: int) -> Iterator[Batch]:
    for idx in plan:
        yield collate([records[i] for i in idx], max_len)
