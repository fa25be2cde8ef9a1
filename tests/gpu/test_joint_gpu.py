"""Medusa-2 on a GPU with the default model in bfloat16: a joint step under autocast trains the
adapters (the KL starting at zero), and adapters merged into the fused projections at load give
the adapted model's output: speculative greedy == the adapted backbone's plain greedy."""
import pytest
import torch

from medusa.decoding.generate import generate
from medusa.heads.adapters import save_adapters
from medusa.heads.io import load_heads, save_heads
from medusa.training.data import Record
from medusa.training.joint import JointConfig, JointTrainer
from medusa.training.lora import LoRAConfig, LoRALinear, lora_tensors
from medusa.training.trainer import TrainConfig

pytestmark = pytest.mark.gpu


def records(n=8):
    return [Record(f"r{i}", "greedy", [1, 2 + i, 3], [(7 * i + 11 * k) % 1000 + 5 for k in range(40)]) for i in range(n)]


def test_joint_training_and_merged_adapters_on_a_gpu(tmp_path):
    from medusa.runtime import load_stack

    stack = load_stack(None, heads="none", dtype="bfloat16", device="cuda", progress=False)
    model = stack.model
    heads = load_heads(_shipped("medusa"), model, dtype=torch.float32)
    cfg = TrainConfig(lr=1e-3, warmup_steps=1, max_steps=2, max_tokens=512)
    trainer = JointTrainer(model, heads, records(), [], cfg, JointConfig(LoRAConfig(rank=8, alpha=16.0), adapter_lr_scale=1.0))
    tokens = torch.tensor([r.prompt_ids + r.response_ids for r in records()[:4]])
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[:, 3:] = True
    _, _, extra = trainer._losses(tokens, mask)
    assert float(extra["kl"][0]) / extra["kl"][1] < 1e-3  # adapters at zero: the original (bf16 noise aside)
    m = trainer.train_step(tokens, mask)
    assert torch.isfinite(torch.tensor(m["loss"]))
    assert any(float(v.abs().sum()) > 0 for k, v in lora_tensors(model).items() if k.endswith("lora_B"))
    with torch.no_grad():  # a visible change of the backbone
        for mod in model.modules():
            if isinstance(mod, LoRALinear):
                mod.lora_B.normal_(std=0.02)
    entry = save_adapters(tmp_path, lora_tensors(model), 8, 16.0, LoRAConfig().targets, heads.config.base_fingerprint)
    heads.config = type(heads.config)(**{**heads.config.to_dict(), "extra": {**heads.config.extra, "adapters": entry}})
    save_heads(heads.eval().requires_grad_(False), tmp_path)

    # a fresh (fused) bfloat16 model with the adapters merged at load against the unmerged one
    served = load_stack(None, heads=str(tmp_path), dtype="bfloat16", device="cuda", progress=False)
    ids = torch.tensor([stack.tokenizer.encode_prompt("Explain tree attention in two sentences.")], device="cuda")
    with torch.no_grad():
        pos = torch.arange(ids.shape[1], device="cuda")[None]
        causal = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool, device="cuda").tril()[None]
        merged = served.model(ids, pos, served.model.new_cache(1, ids.shape[1]), pos, causal).logits.float()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            unmerged = model(ids, pos, model.new_cache(1, ids.shape[1]), pos, causal).logits.float()
    agree = (merged.argmax(-1) == unmerged.argmax(-1)).float().mean()
    assert agree > 0.95, float(agree)
    # the golden property, in float32 (TF32 off) where it is exact
    torch.backends.cuda.matmul.allow_tf32 = False
    exact = load_stack(None, heads=str(tmp_path), dtype="float32", device="cuda", progress=False)
    prompt = ids[0].tolist()
    plain = [t for c in generate(exact.model, prompt, max_new_tokens=64) for t in c.tokens]
    spec = [t for c in generate(exact.model, prompt, heads=exact.heads, max_new_tokens=64) for t in c.tokens]
    assert spec == plain


def _shipped(name):
    from medusa.runtime import shipped_heads_dir

    d = shipped_heads_dir(name)
    if d is None:
        pytest.skip(f"no shipped {name} heads")
    return d
