"""Every bucket rule of the decoding core in one place: the fixed shapes that steps and
prefills run at (so that each shape can be one CUDA graph) and the batch sizes whose step
costs the speculation policy measures together.

  batch bucket   rows a step runs over: 1, 2, 4, ... below the engine's max batch, then it;
  KV bucket      cache slots a step attends over: 256, 512, ... capped at the cache length
                 (coarse, few graphs), or the next multiple of KV_BUCKET when nothing is
                 captured (eager steps pay only for the slots they need);
  prompt bucket  tokens a padded prefill forward takes: 16, 32, ... below the longest prompt
                 (every multiple of 16 when nothing is captured);
  cost bucket    batch sizes whose step costs are measured together (the next power of two).

Pure functions of integers; nothing here knows tensors, models or requests."""
from __future__ import annotations

KV_BUCKET = 64  # eager steps attend over the cache up to a multiple of this many slots
KV_BUCKETS = (256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)  # captured steps
MIN_LEN_BUCKET = 16  # the smallest prompt bucket


def doubling(limit: int, first: int = 1) -> tuple[int, ...]:
    """first, 2*first, 4*first, ... below limit, then limit itself."""
    out, b = [], first
    while b < limit:
        out.append(b)
        b *= 2
    return tuple(out) + (limit,)


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """1, 2, 4, ... below max_batch, then max_batch itself."""
    return doubling(max_batch)


def length_buckets(max_len: int, fine: bool = False) -> tuple[int, ...]:
    """16, 32, 64, ... below max_len, then max_len itself (few shapes: one graph each); fine:
    every multiple of 16 below max_len instead (eager prefills pay at most 15 padding tokens)."""
    first = min(MIN_LEN_BUCKET, max_len)
    if fine:
        return tuple(range(first, max_len, MIN_LEN_BUCKET)) + (max_len,)
    return doubling(max_len, first)


def bucket_of(n: int, buckets: tuple[int, ...]) -> int | None:
    """The smallest bucket holding n, or None when none does."""
    return next((b for b in buckets if b >= n), None)


def kv_round(needed: int, max_len: int) -> int:
    """Cache slots to attend over for `needed` slots: the next multiple of KV_BUCKET, capped."""
    return min(max_len, -(-needed // KV_BUCKET) * KV_BUCKET)


def kv_bucket(needed: int, max_len: int) -> int:
    """Smallest of KV_BUCKETS holding `needed` slots (capped at the cache length)."""
    for b in KV_BUCKETS:
        if b >= needed:
            return min(b, max_len)
    return max_len


def cost_bucket(b: int) -> int:
    """Batch sizes measured together: 1, 2, 4, 8, ... (the next power of two)."""
    return 1 << max(0, (b - 1).bit_length())
