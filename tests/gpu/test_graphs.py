"""CUDA-graph decode steps (GPU only): replayed steps give exactly the eager greedy output.

Run in float32 so that the comparison is exact; bfloat16 runs the same captured code."""
import time

import pytest
import torch

from medusa.decoding.generate import Stats, generate, single_engine

pytestmark = pytest.mark.gpu


def engine(stack, heads, tree, graphs=True):
    """A batch-1 engine decoding with `tree` (heads None: plain), CUDA graphs on or off."""
    return single_engine(stack.model, heads, tree, max_seq_len=1024, graphs=graphs)


def decode(stack, ids, heads, tree, runner=None, n=64):
    """runner: an engine from `engine` (None: a fresh eager one)."""
    st = Stats()
    runner = runner or engine(stack, heads, tree, graphs=False)
    out = [t for c in generate(stack.model, ids, max_new_tokens=n, stats=st, engine=runner) for t in c.tokens]
    return out, st


@pytest.mark.parametrize("tree", ["chain", "tree16", "tree64", "medusa/assets/heads/hydra/tree128.json",
                                  "tree64+lookup8", "medusa/assets/heads/hydra/tree128.json+lookup16"])
def test_graphed_spec_equals_eager_ar(gpu_stack, mt_texts, tree):
    s = gpu_stack
    prompts = [s.tokenizer.encode_prompt(t) for t in mt_texts[:5]]
    runner = engine(s, s.heads, tree)
    ar_runner = engine(s, None, None)
    for ids in prompts:
        ref, _ = decode(s, ids, None, None)
        assert decode(s, ids, None, None, ar_runner)[0] == ref
        out, st = decode(s, ids, s.heads, tree, runner)
        assert out == ref
    assert runner.stats()["graphs_captured"], "no graph was captured"
    # the prompts' forwards replayed graphs too (Hydra++: with the heads' prefix layer inside)
    assert runner.stats()["prefill_graphs_captured"] and ar_runner.stats()["prefill_graphs_captured"]


def test_graph_speed_report(gpu_stack, mt_texts):
    """Not a timing assertion: prints eager vs graphed tokens/s for the record (see medusa bench)."""
    s = gpu_stack
    ids = s.tokenizer.encode_prompt(mt_texts[0])
    runner = engine(s, s.heads, s.tree)
    ar_runner = engine(s, None, None)
    rows = {}
    for name, heads, tree, r in [("ar-eager", None, None, engine(s, None, None, False)), ("ar-graph", None, None, ar_runner),
                                 ("spec-eager", s.heads, s.tree, engine(s, s.heads, s.tree, False)),
                                 ("spec-graph", s.heads, s.tree, runner)]:
        decode(s, ids, heads, tree, r, n=16)  # warm-up / capture
        torch.cuda.synchronize()
        t = time.perf_counter()
        out, st = decode(s, ids, heads, tree, r, n=128)
        rows[name] = (st.new_tokens / (time.perf_counter() - t), st.mean_accepted)
    print({k: (round(v[0], 1), round(v[1], 2)) for k, v in rows.items()})
    assert all(v[0] > 0 for v in rows.values())



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matmul_attention_equals_sdpa_on_gpu(dtype):
    """The small-shape attention path (float32 scores out of a reduced-precision GEMM) matches
    SDPA's memory-efficient kernel at the step's shapes."""
    import torch.nn.functional as F

    from medusa.model.llama import attend_matmul

    g = torch.Generator(device="cuda").manual_seed(0)
    for B, R, S in ((1, 3, 256), (4, 192, 1024), (64, 3, 512)):
        q, k, v = (torch.randn(B, 3, n, 64, device="cuda", dtype=dtype, generator=g) for n in (R, S, S))
        seen = torch.randint(1, S, (B,), device="cuda", generator=g)
        mask = (torch.arange(S, device="cuda")[None] < seen[:, None])[:, None, None, :].expand(B, 1, R, S)
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(attend_matmul(q, k, v, ~mask, scale=64 ** -0.5).float(), ref, rtol=tol, atol=tol)


def test_matmul_attention_trains_on_gpu():
    """Head training runs the Hydra++ prefix layer with gradients: the matmul attention path
    must have a backward there (bmm's float32-output form has none), with SDPA's gradients."""
    import torch.nn.functional as F

    from medusa.model.llama import attend_matmul

    g = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(2, 3, n, 64, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_() for n in (8, 32, 32))
    mask = torch.ones(8, 32, dtype=torch.bool, device="cuda").tril(24)[None, None].expand(2, 1, 8, 32)
    attend_matmul(q, k, v, ~mask, scale=64 ** -0.5).float().square().sum().backward()
    got = [t.grad.float() for t in (q, k, v)]
    q2, k2, v2 = (t.detach().float().requires_grad_() for t in (q, k, v))
    F.scaled_dot_product_attention(q2, k2, v2, attn_mask=mask).square().sum().backward()
    for a, b in zip(got, (q2.grad, k2.grad, v2.grad)):
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_topk_kernel_equals_torch_topk_on_gpu(dtype):
    """The heads' Triton top-k (medusa.kernels.topk) gives torch.topk's values, best first, at
    the heads' shapes (a few rows of a whole or draft vocabulary), with the token-id map."""
    pytest.importorskip("triton")
    from medusa.kernels.topk import topk_ids

    g = torch.Generator(device="cuda").manual_seed(2)
    for chunk in (0, 512, 1024, None):  # one program per row; split into pieces, then merged; as measured
        for P, F_, k in ((1, 49152, 10), (11, 32768, 5), (64, 32768, 10), (3, 1000, 1), (2, 3000, 64)):
            x = torch.randn(P, F_, device="cuda", generator=g).to(dtype)
            ids = torch.randperm(49152, device="cuda", generator=g)[:F_]
            got = topk_ids(x, k, kernel=True, chunk=chunk)
            assert got.shape == (P, k)
            torch.testing.assert_close(x.gather(1, got), x.topk(k, dim=-1).values, rtol=0, atol=0)
            assert torch.equal(topk_ids(x, k, ids, kernel=True, chunk=chunk), ids[got])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_attention_equals_the_matmul_path_on_gpu(dtype):
    """medusa.kernels.attention at the step's shapes (queries as the projection leaves them,
    tree-shaped visibility) against attend_matmul with the model's layout copies."""
    pytest.importorskip("triton")
    from medusa.decoding.step import attention_mask
    from medusa.kernels.attention import tree_attention
    from medusa.model.llama import attend_matmul

    g = torch.Generator(device="cuda").manual_seed(3)
    # the long spans at batch 1-4 run split (medusa.kernels.attention.kv_splits)
    for B, N, S in ((1, 1, 256), (1, 64, 1024), (4, 16, 512), (64, 4, 320), (1, 1, 4096), (1, 64, 2048), (4, 4, 1000)):
        qkv = torch.randn(B, N, 15, 64, device="cuda", dtype=dtype, generator=g) * 0.3
        q = qkv[:, :, :9]
        k, v = (torch.randn(B, 3, S, 64, device="cuda", dtype=dtype, generator=g) for _ in range(2))
        start = torch.randint(1, S - N, (B,), device="cuda", generator=g)
        local = torch.ones(N, N, dtype=torch.bool, device="cuda").tril()
        local &= torch.rand(N, N, device="cuda", generator=g) < 0.6
        local |= torch.eye(N, dtype=torch.bool, device="cuda")
        visible = attention_mask(start, local, S)
        hidden = (~visible)[:, None].repeat(1, 1, 3, 1)
        ref = attend_matmul(q.transpose(1, 2).reshape(B, 3, 3 * N, 64), k, v, hidden).reshape(B, 9, N, 64).transpose(1, 2)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        for splits in (None, 1, 4):
            torch.testing.assert_close(tree_attention(q, k, v, visible, splits=splits).float(), ref.float(), rtol=tol, atol=tol)


def test_graphed_spec_equals_eager_ar_with_triton_attention(gpu_stack, mt_texts, monkeypatch):
    """MEDUSA_ATTENTION=triton through the graphed decode loop: speculative greedy output equals
    plain greedy output (float32), the kernel captured in the graphs."""
    pytest.importorskip("triton")
    from medusa.kernels import attention_choice

    monkeypatch.setattr(attention_choice, "ATTENTION", "triton")
    s = gpu_stack
    runner = engine(s, s.heads, "tree64")
    for t in mt_texts[:3]:
        ids = s.tokenizer.encode_prompt(t)
        ref, _ = decode(s, ids, None, None)
        assert decode(s, ids, s.heads, "tree64", runner)[0] == ref
    assert runner.stats()["graphs_captured"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_draft_and_accept_kernels_equal_their_torch_paths_on_gpu(dtype):
    """medusa.kernels.draft (head inputs, residual SiLU), the top-k written into the candidates
    and medusa.kernels.accept, compiled, against their torch paths at the step's shapes."""
    pytest.importorskip("triton")
    from medusa.decoding import verify as V
    from medusa.decoding.sampling import BatchSampling, SamplingParams
    from medusa.decoding.tree import load_tree
    from medusa.kernels import accept, draft
    from medusa.kernels.topk import Into, into_plan, topk_ids

    g = torch.Generator(device="cuda").manual_seed(3)
    for B, P, d in ((1, 1, 1), (1, 11, 3), (16, 8, 4)):
        s = torch.randn(B, 576, device="cuda", generator=g).to(dtype)
        cand = torch.randint(0, 49152, (B, 64), device="cuda", generator=g)
        chains = torch.randint(0, 64, (P, d), device="cuda", generator=g)
        w = torch.randn(49152, 576, device="cuda", generator=g).to(dtype)
        assert torch.equal(draft.head_inputs(s, cand, chains, w, kernel=True), draft.head_inputs(s, cand, chains, w, kernel=False))
        y = torch.randn(B, P, 576, device="cuda", generator=g).to(dtype)
        tol = 1e-6 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(draft.add_silu(s[:, None], y, kernel=True).float(), (s[:, None] + torch.nn.functional.silu(y)).float(),
                                   rtol=tol, atol=tol)
    dest = [[1, 2, 3, -1], [4, 5, -1, -1], [7, -1, -1, -1], [10, 11, 12, -1], [13, 14, 15, 6]]  # 5 parents' nodes
    for chunk in (0, None):
        x = torch.randn(2, 5, 32768, device="cuda", generator=g)  # float32: no ties, so torch's order is the kernel's
        ids = torch.randperm(49152, device="cuda", generator=g)[:32768]
        want = topk_ids(x, 4, ids, kernel=False, into=Into(torch.zeros(2, 16, dtype=torch.long, device="cuda"), *into_plan(dest, "cuda")))
        got = topk_ids(x, 4, ids, kernel=True, chunk=chunk, into=Into(torch.zeros(2, 16, dtype=torch.long, device="cuda"), *into_plan(dest, "cuda")))
        assert torch.equal(got, want)
    sampling = BatchSampling.stack([SamplingParams()] * 8, "cuda")
    for tree in (load_tree("ar"), load_tree("tree64"), load_tree("medusa/assets/heads/hydra/tree128.json")):
        tree = tree.to("cuda")
        for cap in (None, torch.randint(0, 5, (8,), device="cuda", generator=g)):
            cand = torch.randint(0, 3, (8, tree.num_nodes), device="cuda", generator=g)
            target = torch.randint(0, 3, (8, tree.num_nodes), device="cuda", generator=g)
            want = V._accept(target, cand, None, tree, sampling, tree.parent, tree.retrieve, cap)
            got = accept.accept(target, cand, tree.parent, tree.retrieve, cap)
            assert all(torch.equal(a, b) for a, b in zip(got, (want.path, want.length, want.tokens, want.last_node)))


def test_compiled_step_graphs_equal_eager_and_leave_the_model_alone(gpu_stack, mt_texts):
    """compile_mode: the runner's step graphs run torch.compiled per-layer pieces (graphs.CompiledBlocks);
    the output is the eager greedy output, and no module of the model had a method rebound."""
    s = gpu_stack
    ids = s.tokenizer.encode_prompt(mt_texts[0])
    ref, _ = decode(s, ids, None, None)
    runner = single_engine(s.model, s.heads, "tree16", max_seq_len=1024, graphs=True, compile_mode="")
    assert decode(s, ids, s.heads, "tree16", runner)[0] == ref
    assert not any("forward" in vars(m) or "project" in vars(m) for m in s.model.modules())
