"""Tensor parallelism over NCCL: `medusa generate --tp 1` (the replica path: sharding at world
1, the engine's runner behind the lockstep wrapper, CUDA graphs) prints the tokens of the plain
engine; a random model at TP 2 (needs 2 GPUs) in float32 gives the logits of TP 1 and, through
the Engine with CUDA graphs on each rank, the same greedy tokens up to the first near-tie."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from medusa.model.config import ModelConfig
from medusa.model.llama import Transformer
from medusa.decoding.generate import generate, single_engine
from medusa.parallel.launch import launch
from medusa.parallel.load import load_sharded
from medusa.parallel.replica import replica

pytestmark = pytest.mark.gpu
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _rank(group, ckpt, teacher, prompt, n):
    model, _ = load_sharded(ckpt, group, torch.float32)
    with torch.inference_mode():  # every rank: the forward's collectives pair up
        T = len(teacher[0])
        pos = torch.arange(T, device=model.device)[None]
        mask = torch.ones(T, T, dtype=torch.bool, device=model.device).tril()[None]
        logits = model(torch.tensor(teacher, device=model.device), pos, model.new_cache(1, T), pos, mask).logits.cpu()
    with replica(group, model) as driving:
        if not driving:
            return None
        eng = single_engine(model, None, "ar", max_seq_len=len(prompt) + n, graphs=True)
        greedy = [t for c in generate(model, prompt, engine=eng, max_new_tokens=n, stop_token_ids=()) for t in c.tokens]
        return {"logits": logits.numpy(), "greedy": greedy, "graphs": eng.stats()["graphs_captured"]}


def _generate_json(*extra):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    out = subprocess.run([sys.executable, "-m", "medusa.cli", "generate", "Explain tree attention in two sentences.",
                          "--json", "--dtype", "float32", "--max-new-tokens", "48", "--mode", "spec", *extra],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_tp1_replica_path_with_graphs_equals_the_plain_engine():
    """--tp 1 starts one NCCL rank and decodes through medusa.parallel.replica (the lockstep
    wrapper around the runner, graphs captured through it): the same tokens as the engine
    without --tp (float32: both load the same weights, so the same forward)."""
    plain, tp1 = _generate_json(), _generate_json("--tp", "1")
    assert tp1["token_ids"] == plain["token_ids"] and len(plain["token_ids"]) > 0


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
    assert got["graphs"] > 0  # the steps replayed as CUDA graphs, NCCL collectives inside
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
