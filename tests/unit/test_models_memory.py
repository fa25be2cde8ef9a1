"""KV sizing from device memory (medusa/model/memory.py): the arithmetic of plan_kv on the
numbers of real devices and models, and its refusals."""
import pytest

from medusa.errors import ModelLoadError
from medusa.model.memory import GiB, MAX_BATCH_CAP, plan_kv, step_reserve_bytes
from medusa.bench.step_cost import SHAPES


def test_llama3_8b_on_an_80gb_card():
    cfg = SHAPES["llama3-8b"]
    per_token = cfg.kv_bytes_per_token  # 32 layers x 8 kv heads x 128 x 2 (K, V) x 2 bytes = 128 KiB
    assert per_token == 32 * 8 * 128 * 2 * 2 == 131072
    total, weights = 80 * GiB, 16 * GiB
    plan = plan_kv(total, total - weights, 0.9, per_token, row_tokens=4096 + 65, max_seq_len=4096,
                   reserve_bytes=4 * GiB)
    budget = int(0.9 * total) - weights - 4 * GiB  # 52 GiB
    assert plan.budget_bytes == budget
    assert plan.row_bytes == per_token * 4161
    assert plan.rows == budget // (per_token * 4161) == 102
    assert plan.max_batch == MAX_BATCH_CAP and plan.kept_rows == 102 - MAX_BATCH_CAP
    assert plan.kv_budget_tokens == 102 * 4096
    assert plan.kv_bytes <= budget < plan.kv_bytes + plan.row_bytes  # every row that fits, no more


def test_a_small_budget_gives_every_row_to_the_batch_and_a_given_max_batch_is_kept():
    plan = plan_kv(24 * GiB, 20 * GiB, 0.5, 1 << 20, row_tokens=1000, max_seq_len=990)
    # 12 GiB allowed - 4 GiB in use = 8 GiB; rows of 1000 MiB -> 8
    assert (plan.rows, plan.max_batch, plan.kept_rows) == (8, 8, 0)
    plan = plan_kv(24 * GiB, 20 * GiB, 0.5, 1 << 20, row_tokens=1000, max_seq_len=990, max_batch=3)
    assert (plan.rows, plan.max_batch, plan.kept_rows) == (8, 3, 5)
    # per-row state beyond the KV (heads' own KV) takes its share
    assert plan_kv(24 * GiB, 20 * GiB, 0.5, 1 << 20, 1000, 990, extra_row_bytes=1000 << 20).rows == 4


def test_refusals_are_one_line():
    with pytest.raises(ModelLoadError, match="no KV row"):
        plan_kv(80 * GiB, 5 * GiB, 0.9, 1 << 17, 4161, 4096)  # 75 GiB in use, 72 allowed
    with pytest.raises(ModelLoadError, match="only"):
        plan_kv(24 * GiB, 20 * GiB, 0.5, 1 << 20, 1000, 990, max_batch=9)
    with pytest.raises(ModelLoadError, match="gpu_memory_utilization"):
        plan_kv(24 * GiB, 20 * GiB, 1.5, 1 << 20, 1000, 990)


def test_step_reserve_counts_the_logits_of_every_node():
    cfg = SHAPES["llama3-8b"]
    r = step_reserve_bytes(64, 64, cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size)
    assert r >= 64 * 64 * cfg.vocab_size * 4 + GiB
    assert r < 4 * 64 * 64 * cfg.vocab_size * 4 + GiB
