"""Tensor parallelism over NCCL (needs 2 GPUs): a random model at TP 2 in float32 gives the
logits of TP 1 and the same greedy tokens up to the first near-tie, through the lockstep demo."""
import json

import pytest
import torch
from safetensors.torch import save_file

from medusa.model.config import ModelConfig
from medusa.model.llama import Transformer
from medusa.parallel.decode import Executor, decode
from medusa.parallel.launch import launch
from medusa.parallel.load import load_sharded
from medusa.parallel.lockstep import Lockstep, StepPlan

pytestmark = pytest.mark.gpu


def _rank(group, ckpt, teacher, prompt, n):
    model, _ = load_sharded(ckpt, group, torch.float32)
    lock = Lockstep(group, Executor(model))
    if group.rank:
        lock.serve()
        return None
    try:
        return {"logits": lock.run(StepPlan("logits", {"tokens": teacher})).numpy(), "greedy": decode(lock, prompt, n)}
    finally:
        lock.stop()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_tp2_nccl_matches_tp1(tmp_path):
    cfg = ModelConfig(arch="llama", vocab_size=1000, hidden_size=256, intermediate_size=512, num_layers=2,
                      num_heads=8, num_kv_heads=2, head_dim=32, max_position_embeddings=256)
    torch.manual_seed(0)
    model = Transformer(cfg).eval().requires_grad_(False)
    state = {("model." + k if k != "lm_head.weight" else k): v for k, v in model.state_dict().items()}
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf()))
    teacher = [list(range(1, 40))]
    prompt, n = list(range(5, 15)), 16
    got = launch(_rank, 2, str(tmp_path), teacher, prompt, n, backend="nccl", timeout_s=600)[0]
    model = model.cuda()
    with torch.inference_mode():
        T = len(teacher[0])
        pos = torch.arange(T, device="cuda")[None]
        mask = torch.ones(T, T, dtype=torch.bool, device="cuda").tril()[None]
        ref = model(torch.tensor(teacher, device="cuda"), pos, model.new_cache(1, T), pos, mask).logits.cpu()
        assert (torch.from_numpy(got["logits"]) - ref).abs().max().item() < 1e-3
        ids = list(prompt)
        for i in range(n):
            T = len(ids)
            pos = torch.arange(T, device="cuda")[None]
            mask = torch.ones(T, T, dtype=torch.bool, device="cuda").tril()[None]
            last = model(torch.tensor([ids], device="cuda"), pos, model.new_cache(1, T), pos, mask).logits[0, -1]
            top = last.topk(2).values
            if (top[0] - top[1]).item() < 1e-3:
                break  # a near-tie: compare no further
            assert got["greedy"][i] == int(last.argmax())
            ids.append(int(last.argmax()))
