"""medusa.kernels: the Triton top-k against torch.topk, run by Triton's interpreter on CPU
tensors in a child process (the interpreter is chosen when Triton is first imported); skipped
where Triton is not installed. tests/gpu runs the compiled kernel."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from medusa.kernels import topk as topk_mod

ROOT = Path(__file__).resolve().parents[2]

CHECKS = textwrap.dedent('''
    import torch
    from medusa.kernels.topk import topk_ids

    g = torch.Generator().manual_seed(0)
    for shape, k in (((5, 37), 1), ((5, 37), 37), ((3, 1000), 10), ((2, 3, 300), 4)):
        x = torch.randn(*shape, generator=g)
        got = topk_ids(x, k, kernel=True)
        assert got.shape == (*shape[:-1], k) and got.dtype == torch.long
        assert torch.equal(got, x.topk(k, dim=-1).indices), shape  # distinct values: the same columns, in order
        ids = torch.randperm(50000, generator=g)[:shape[-1]]
        assert torch.equal(topk_ids(x, k, ids, kernel=True), ids[got])
    # ties go to the lower column; bfloat16 rows are compared in float32
    x = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0]]).to(torch.bfloat16)
    assert topk_ids(x, 4, kernel=True).tolist() == [[1, 2, 4, 3]]
    cols = torch.randn(4, 64, generator=g)[:, ::2]  # a non-contiguous view
    assert torch.equal(topk_ids(cols, 3, kernel=True), cols.topk(3, dim=-1).indices)
    print("checked")
''')


def test_topk_kernel_gives_torch_topk_best_first_under_the_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", CHECKS], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "checked" in r.stdout, r.stderr[-3000:]


def test_torch_fallback_on_cpu_and_when_switched_off(monkeypatch):
    x = torch.randn(3, 100, generator=torch.Generator().manual_seed(2))
    assert not topk_mod._use_kernel(x, 5)  # CPU tensors take torch.topk
    monkeypatch.setenv("MEDUSA_KERNELS", "torch")
    assert not topk_mod._use_kernel(x, 5)
    ids = torch.arange(100).flip(0)
    assert torch.equal(topk_mod.topk_ids(x, 5, ids), ids[x.topk(5, dim=-1).indices])
    assert torch.equal(topk_mod.topk_ids(x, 5), x.topk(5, dim=-1).indices)
