"""Shared fixtures: the default model (float32, CPU) loaded once per session, a tiny random
model for fast exact tests, and the `gpu` marker's skip."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("MEDUSA_CACHE", str(ROOT / ".cache" / "medusa"))
MT_BENCH = ROOT / "medusa" / "bench" / "datasets" / "mt_bench" / "question.jsonl"  # shipped with the package


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def stack():
    """The embedded default model with its tokenizer and the default heads, float32 on CPU."""
    from medusa.runtime import load_stack

    return load_stack(None, heads="default", dtype="float32", device="cpu", progress=False)


@pytest.fixture(scope="session")
def mt_texts():
    """The first 10 MT-Bench first turns."""
    from medusa.commands.common import read_prompts

    return [p.text for p in read_prompts(MT_BENCH, limit=10)]


@pytest.fixture(scope="session")
def mt_prompts(stack, mt_texts):
    """Chat-templated token ids of the first 10 MT-Bench first turns."""
    return [stack.tokenizer.encode_prompt(t) for t in mt_texts]


def tiny_config(vocab: int = 8, **kw):
    from medusa.model.config import ModelConfig

    base = dict(arch="llama", vocab_size=vocab, hidden_size=32, intermediate_size=64, num_layers=2,
                num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=128, eos_token_ids=())
    base.update(kw)
    return ModelConfig(**base)


def tiny_model(seed: int = 0, **kw):
    from medusa.model.llama import Transformer

    torch.manual_seed(seed)
    m = Transformer(tiny_config(**kw))
    for p in m.parameters():  # larger weights than default init: peaky, varied distributions
        torch.nn.init.normal_(p, std=0.5) if p.dim() > 1 else None
    return m.eval().requires_grad_(False)
