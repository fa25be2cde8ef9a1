"""Size the KV pool from the device's memory: a pure function of byte counts.

The engine may hold a fraction `utilization` of the device's total memory (as vLLM's
gpu_memory_utilization). What is in use when the engine is built (the weights, the heads, the
CUDA context, anything else on the device) counts against it; a reserve is kept for the step's
activations, logits and captured graphs; the rest holds KV rows of `row_tokens` slots each.
`max_batch` (rows decoded together) follows, capped, unless given; the remaining rows keep
finished sessions' KV for their next turn (the engine's `kv_budget_tokens` = rows x max_seq_len).

Knows nothing of devices or of the engine: callers pass the numbers (torch.cuda.mem_get_info)
and apply the plan."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from medusa.errors import ModelLoadError

MAX_BATCH_CAP = 64  # rows decoded together when the memory would allow more: the step's cost grows past it
GiB = 1 << 30


@dataclass(frozen=True)
class KVPlan:
    rows: int  # KV rows allocated (each row_tokens slots)
    max_batch: int  # rows decoded together
    kept_rows: int  # rows beyond max_batch: only kept sessions use them
    kv_budget_tokens: int  # rows x max_seq_len (the engine's argument)
    row_bytes: int
    kv_bytes: int  # rows x row_bytes
    budget_bytes: int  # what the fraction left for KV

    def as_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        return (f"KV pool: {self.rows} rows of {self.row_bytes / 2**20:.1f} MiB ({self.kv_bytes / GiB:.2f} GiB of "
                f"{self.budget_bytes / GiB:.2f} GiB left by the memory fraction): max_batch {self.max_batch}, "
                f"{self.kept_rows} more rows for kept sessions")


def step_reserve_bytes(max_batch: int, max_nodes: int, vocab: int, hidden: int, intermediate: int,
                       act_bytes: int = 2) -> int:
    """Activations of one step at full batch, counted generously: the float32 logits of every
    node plus a few hidden/MLP-wide tensors per token, and a fixed 1 GiB for graphs and the
    allocator's slack."""
    tokens = max_batch * max_nodes
    return tokens * (vocab * 4 + 8 * hidden * act_bytes + 3 * intermediate * act_bytes) + GiB


def plan_kv(total_bytes: int, free_bytes: int, utilization: float, kv_bytes_per_token: int, row_tokens: int,
            max_seq_len: int, reserve_bytes: int = 0, max_batch: int | None = None,
            extra_row_bytes: int = 0) -> KVPlan:
    """The KV pool that fits. total_bytes / free_bytes: the device's, now (weights loaded);
    kv_bytes_per_token: K and V of one token over all layers in the cache's dtype; row_tokens:
    slots per row (max_seq_len plus the step's tree slots); extra_row_bytes: other per-row state
    (heads' KV, pending hidden states). ModelLoadError when not one row fits."""
    if not 0.0 < utilization <= 1.0:
        raise ModelLoadError(f"gpu_memory_utilization must be in (0, 1], got {utilization}")
    used = total_bytes - free_bytes
    budget = int(utilization * total_bytes) - used - reserve_bytes
    row_bytes = kv_bytes_per_token * row_tokens + extra_row_bytes
    rows = max(0, budget) // row_bytes if row_bytes > 0 else 0
    if rows < 1:
        raise ModelLoadError(
            f"no KV row of {max_seq_len} tokens ({row_bytes / 2**20:.0f} MiB) fits: {used / GiB:.1f} GiB of "
            f"{total_bytes / GiB:.1f} GiB in use, {utilization:.2f} of it allowed, {reserve_bytes / GiB:.1f} GiB "
            "kept for the step: raise gpu_memory_utilization or lower max_seq_len")
    batch = min(rows, MAX_BATCH_CAP) if max_batch is None else max_batch
    if batch > rows:
        raise ModelLoadError(f"max_batch {max_batch} needs {batch} KV rows of {max_seq_len} tokens but only {rows} fit "
                             f"in gpu_memory_utilization {utilization}")
    return KVPlan(rows=rows, max_batch=batch, kept_rows=rows - batch, kv_budget_tokens=rows * max_seq_len,
                  row_bytes=row_bytes, kv_bytes=rows * row_bytes, budget_bytes=max(0, budget))
