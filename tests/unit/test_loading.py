"""Lazy loading (medusa/model/loading.py): a bfloat16 checkpoint loaded into a bfloat16 model
never materialises a float32 tensor of a weight's size (every aten op of the load is watched),
the per-tensor iterator reads slices without the whole tensor, and progress reaches the end.
Peak RSS figures are measured by scripts/load_bench.py, not asserted here."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from medusa.model.loading import count_tensors, iter_checkpoint, load_model

transformers = pytest.importorskip("transformers")


class _Float32Watch(TorchDispatchMode):
    """Records the largest float32 tensor any op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.device.type != "meta":
                self.largest = max(self.largest, t.numel())
        return out


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("bf16")
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(str(path))
    return path


def test_bf16_load_holds_no_float32_copy_of_the_weights(bf16_checkpoint):
    watch = _Float32Watch()
    with watch:
        model, _ = load_model(bf16_checkpoint, dtype=torch.bfloat16, device="cpu")
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    rope = model.rope_cos.numel()  # the float32 RoPE tables [P, Dh] are built on purpose
    smallest_matrix = min(p.numel() for p in model.parameters() if p.dim() == 2)
    assert rope < smallest_matrix  # so the bound below tells them apart
    assert watch.largest <= rope


def test_iterator_reads_slices_and_progress_reaches_the_end(bf16_checkpoint):
    items = dict(iter_checkpoint(bf16_checkpoint))
    assert len(items) == count_tensors(bf16_checkpoint)
    sl = items["embed_tokens.weight"]  # the `model.` prefix is gone
    assert sl.get_shape() == [512, 64]
    rows = sl[10:20]  # what a tensor-parallel caller does with its shard of a weight
    assert rows.shape == (10, 64) and torch.equal(rows, sl[:][10:20])
    seen = []
    load_model(bf16_checkpoint, dtype=torch.float32, device="cpu", progress=lambda d, t, w: seen.append((d, t)))
    assert seen[-1] == (len(items) - 1, len(items))
