"""The bucket rules (buckets.py): every fixed shape a step or prefill runs at."""
from medusa.decoding.buckets import (batch_buckets, bucket_of, cost_bucket, kv_bucket, kv_round, length_buckets)


def test_batch_and_prompt_buckets():
    assert batch_buckets(1) == (1,) and batch_buckets(6) == (1, 2, 4, 6) and batch_buckets(64) == (1, 2, 4, 8, 16, 32, 64)
    assert length_buckets(100) == (16, 32, 64, 100) and length_buckets(8) == (8,)
    assert length_buckets(100, fine=True) == (16, 32, 48, 64, 80, 96, 100) and length_buckets(8, fine=True) == (8,)
    assert [bucket_of(n, (1, 2, 4, 6)) for n in (1, 3, 5, 6, 7)] == [1, 4, 6, 6, None]


def test_kv_buckets_cover_what_a_step_attends_over():
    assert [kv_bucket(n, 4096) for n in (1, 256, 257, 1500)] == [256, 256, 512, 2048]
    assert kv_bucket(300, 300) == 300 and kv_bucket(10 ** 6, 5000) == 5000  # capped at the cache
    assert [kv_round(n, 1000) for n in (1, 64, 65, 999)] == [64, 64, 128, 1000]
    for n in range(1, 3000, 37):  # every bucket holds what it was asked for, within the cache
        assert n <= kv_bucket(n, 4096) <= 4096 and n <= kv_round(n, 4096)


def test_cost_buckets():
    assert [cost_bucket(b) for b in (1, 2, 3, 5, 64, 65)] == [1, 2, 4, 8, 64, 128]
