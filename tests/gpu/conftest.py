"""Fixtures of the GPU tests (skipped without a GPU: tests/conftest.py)."""
import pytest
import torch


@pytest.fixture(scope="module")
def gpu_stack():
    """The default model and heads in float32 on the GPU, TF32 off, so that comparisons are exact."""
    from medusa.runtime import load_stack

    torch.backends.cuda.matmul.allow_tf32 = False
    return load_stack(None, heads="default", dtype="float32", device="cuda", progress=False)
