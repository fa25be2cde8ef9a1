"""medusa.kernels: the Triton top-k against torch.topk, the Triton attention against the
model's own attention, and the draft and acceptance kernels against their torch paths, run by Triton's interpreter on CPU tensors in a child process (the
interpreter is chosen when Triton is first imported); skipped where Triton is not installed
(CI), and the attention check where the interpreter cannot run under the installed numpy (to run
it here: PYTHONPATH=<triton 3.6 and numpy 2.2 installed with pip --target>). tests/gpu runs the
compiled kernels."""
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
    # chunk 0: one program per row; 16 and 64: rows split into pieces, then merged (a piece
    # may hold fewer columns than k, and the last piece is partial)
    for chunk in (0, 16, 64):
        for shape, k in (((5, 37), 1), ((5, 37), 37), ((3, 1000), 10), ((2, 3, 300), 4)):
            x = torch.randn(*shape, generator=g)
            got = topk_ids(x, k, kernel=True, chunk=chunk)
            assert got.shape == (*shape[:-1], k) and got.dtype == torch.long
            assert torch.equal(got, x.topk(k, dim=-1).indices), (shape, chunk)  # distinct values: the same columns, in order
            ids = torch.randperm(50000, generator=g)[:shape[-1]]
            assert torch.equal(topk_ids(x, k, ids, kernel=True, chunk=chunk), ids[got])
        # ties go to the lower column, across pieces too; bfloat16 rows are compared in float32
        x = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0]]).to(torch.bfloat16)
        assert topk_ids(x, 4, kernel=True, chunk=chunk and 2).tolist() == [[1, 2, 4, 3]]
        cols = torch.randn(4, 64, generator=g)[:, ::2]  # a non-contiguous view
        assert torch.equal(topk_ids(cols, 3, kernel=True, chunk=chunk), cols.topk(3, dim=-1).indices)
    print("checked")
''')


ATTENTION_CHECKS = textwrap.dedent('''
    import torch
    from medusa.decoding.step import attention_mask
    from medusa.kernels.attention import tree_attention
    from medusa.kernels import attention_choice
    from medusa.model import llama
    from tests.conftest import tiny_model

    g = torch.Generator().manual_seed(0)

    def folded_reference(q, k, v, visible):  # the model's matmul path, with its layout copies
        B, N, H, Dh = q.shape
        Hkv = k.shape[1]
        rep = H // Hkv
        hidden = (~visible)[:, None].repeat(1, 1, rep, 1)
        out = llama.attend_matmul(q.transpose(1, 2).reshape(B, Hkv, rep * N, Dh), k, v, hidden)
        return out.reshape(B, H, N, Dh).transpose(1, 2)

    for B, N, Hkv, rep, S, Dh in ((1, 1, 3, 3, 37, 16), (2, 5, 2, 2, 70, 16), (2, 9, 1, 4, 130, 32)):
        qkv = torch.randn(B, N, Hkv * (rep + 2), Dh, generator=g)
        q = qkv[:, :, :Hkv * rep]  # a strided view, as the fused projection leaves it
        cache = torch.randn(2, B, Hkv, S + 11, Dh, generator=g)
        start = torch.randint(1, S - N, (B,), generator=g)
        local = (torch.rand(N, N, generator=g) < 0.5) | torch.eye(N, dtype=torch.bool)  # any ancestor pattern
        visible = attention_mask(start, local, S)
        ref = folded_reference(q, cache[0][:, :, :S], cache[1][:, :, :S], visible)
        for splits in (None, 2, 4):  # None: one part on a CPU tensor
            got = tree_attention(q, cache[0][:, :, :S], cache[1][:, :, :S], visible, splits=splits)
            assert got.shape == (B, N, Hkv * rep, Dh) and got.is_contiguous()
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)

    # a split span where the later parts see nothing (a short row in a long cache) and one
    # that cuts a row's visible slots across parts
    B, N, Hkv, rep, S, Dh = 2, 3, 3, 3, 600, 16
    qkv = torch.randn(B, N, Hkv * (rep + 2), Dh, generator=g)
    q = qkv[:, :, :Hkv * rep]
    k, v = torch.randn(2, B, Hkv, S, Dh, generator=g)
    visible = attention_mask(torch.tensor([40, 420]), torch.ones(N, N, dtype=torch.bool).tril(), S)
    ref = folded_reference(q, k, v, visible)
    for splits in (2, 4, 8):
        torch.testing.assert_close(tree_attention(q, k, v, visible, splits=splits), ref, rtol=1e-5, atol=1e-5)

    # through a whole forward (MEDUSA_ATTENTION=triton, the kernel let run on CPU tensors here):
    # rows with different visible spans, equal to SDPA's forward
    model = tiny_model(seed=5, vocab=16, head_dim=16)
    tokens = torch.randint(0, 16, (3, 9), generator=g)
    start = torch.tensor([0, 4, 11])
    pos = start[:, None] + torch.arange(9)
    mask = attention_mask(start, torch.ones(9, 9, dtype=torch.bool).tril(), 24)

    def run(kind):
        attention_choice.ATTENTION = kind
        with torch.inference_mode():
            return model(tokens, pos, model.new_cache(3, 32), pos, mask).logits

    attention_choice.kernels_enabled = lambda device: True
    torch.testing.assert_close(run("triton"), run("sdpa"), rtol=1e-5, atol=1e-5)
    print("checked")
''')


DRAFT_CHECKS = textwrap.dedent('''
    import torch
    from medusa.kernels import draft, topk
    from medusa.kernels.topk import Into, into_plan, topk_ids

    g = torch.Generator().manual_seed(0)
    # head_inputs: [s; embeddings of the path's candidates], in the table's dtype
    for B, P, d, D, dtype in ((1, 1, 1, 40, torch.float32), (3, 5, 3, 24, torch.float32), (2, 4, 2, 16, torch.bfloat16)):
        s = torch.randn(B, D, generator=g)
        cand = torch.randint(0, 50, (B, 9), generator=g)
        chains = torch.randint(0, 9, (P, d), generator=g)
        w = torch.randn(50, D, generator=g).to(dtype)
        got = draft.head_inputs(s, cand, chains, w, kernel=True)
        assert got.dtype == dtype and got.shape == (B, P, (d + 1) * D)
        assert torch.equal(got, draft.head_inputs(s, cand, chains, w, kernel=False)), (B, P, d)
    # add_silu: res + SiLU(y), res broadcast over the rows (one summary per batch row) or whole
    for res_shape, y_shape in (((3, 1, 24), (3, 5, 24)), ((3, 5, 24), (3, 5, 24)), ((7, 40), (7, 40)), ((1, 40), (4, 40))):
        res, y = torch.randn(*res_shape, generator=g), torch.randn(*y_shape, generator=g)
        torch.testing.assert_close(draft.add_silu(res, y, kernel=True), res + torch.nn.functional.silu(y), rtol=1e-6, atol=1e-6)
    # top-k written into a table: table[b, dest[p, j]] = j-th best of x[b, p], -1 dropped, other columns kept
    dest = [[3, -1, 5], [-1, 1, 2], [4, 6, -1]]
    plan = into_plan(dest, "cpu")
    for chunk in (0, 16):
        for ids in (None, torch.randperm(500, generator=g)[:300]):
            x = torch.randn(2, 3, 300, generator=g)
            want = torch.full((2, 7), -5, dtype=torch.long)
            want = topk_ids(x, 3, ids, kernel=False, into=Into(want, *plan))
            got = topk_ids(x, 3, ids, kernel=True, chunk=chunk, into=Into(torch.full((2, 7), -5, dtype=torch.long), *plan))
            assert torch.equal(got, want), chunk
            best = topk_ids(x, 3, ids, kernel=False)
            assert got[1, 5].item() == best[1, 0, 2].item() and got[0, 0].item() == -5  # placed, and the rest untouched

    # a whole Hydra++ proposal with every kernel on, against torch's path
    from medusa.decoding.tree import build_tree, prior_accuracies, search_tree
    from tests.unit.test_hydra import random_heads, tiny_model

    base = tiny_model()
    heads = random_heads(base, "hydra++")
    tree = build_tree(search_tree(prior_accuracies(3, 6), 24))
    state = heads.new_state(2, 16, base)
    state.last.copy_(torch.randn(2, 32, generator=g))
    root = torch.tensor([5, 17])

    def propose(on):
        draft.enabled = topk.enabled = lambda device: on
        with torch.inference_mode():
            return heads.propose(state, None, root, tree, base)

    assert torch.equal(propose(True), propose(False))
    print("checked")
''')


ACCEPT_CHECKS = textwrap.dedent('''
    import torch
    from medusa.decoding import verify as V
    from medusa.decoding.sampling import BatchSampling, SamplingParams
    from medusa.decoding.tree import build_tree, load_tree, prior_accuracies, search_tree
    from medusa.kernels import accept

    g = torch.Generator().manual_seed(0)
    s = BatchSampling.stack([SamplingParams()] * 6, "cpu")
    trees = [load_tree("ar"), build_tree(search_tree(prior_accuracies(4, 6), 24)), build_tree(search_tree(prior_accuracies(5, 10), 64))]
    seen = set()
    for tree in trees:
        N = tree.num_nodes
        for trial in range(20):
            # targets that often agree with the candidates, so paths of every length occur
            cand = torch.randint(0, 3, (6, N), generator=g)
            target = torch.randint(0, 3, (6, N), generator=g)
            cap = torch.randint(0, 5, (6,), generator=g) if trial % 2 else None
            want = V._accept(target, cand, None, tree, s, tree.parent, tree.retrieve, cap)
            got = accept.accept(target, cand, tree.parent, tree.retrieve, cap)
            for name, a, b in zip(("path", "length", "tokens", "last_node"), got, (want.path, want.length, want.tokens, want.last_node)):
                assert a.dtype == torch.long and torch.equal(a, b), (tree.name, trial, name, a, b)
            seen.update(want.length.tolist())
    assert seen >= {0, 1, 2, 3}, seen

    # a tree per row (dynamic trees): each row's program reads its own parent and retrieve tables
    from medusa.decoding.dynamic_tree import grow
    B, Vs = 16, 3

    def children(level, chains):
        lp = torch.randn(chains.shape[0], chains.shape[1], Vs, generator=g).log_softmax(-1)
        top = lp.topk(2, dim=-1)
        return top.indices, top.values

    seen = set()
    for trial in range(12):
        rows = grow(children, torch.randint(0, Vs, (B,), generator=g), nodes=10, depth=4, topk=2, threshold=0.0)
        target = torch.randint(0, Vs, rows.tokens.shape, generator=g)
        cap = torch.randint(0, 5, (B,), generator=g) if trial % 2 else None
        sB = BatchSampling.stack([SamplingParams()] * B, "cpu")
        want = V._accept(target, rows.tokens, None, rows, sB, rows.parent, rows.retrieve, cap)
        got = accept.accept(target, rows.tokens, rows.parent, rows.retrieve, cap)
        for name, a, b in zip(("path", "length", "tokens", "last_node"), got, (want.path, want.length, want.tokens, want.last_node)):
            assert a.dtype == torch.long and torch.equal(a, b), ("per row", trial, name, a, b)
        seen.update(want.length.tolist())
    assert seen >= {0, 1, 2}, seen

    # through the decode loop: speculative greedy with the kernel equals plain greedy
    from medusa.decoding.generate import Stats, generate
    from tests.unit.test_hydra import random_heads, tiny_model

    V.kernels_enabled = lambda device: True  # verify takes the kernel on these CPU tensors
    base = tiny_model()
    heads = random_heads(base, "hydra", num_heads=3, std=0.05, rest_std=0.01)
    tree = build_tree([[i] for i in range(20)] + [[0, j] for j in range(10)] + [[0, 0, k] for k in range(5)])
    for ids in ([1, 2, 3, 4, 5], [7, 7, 7]):
        plain = [t for c in generate(base, ids, max_new_tokens=16, stop_token_ids=()) for t in c.tokens]
        stats = Stats()
        spec = [t for c in generate(base, ids, heads=heads, tree=tree, max_new_tokens=16, stop_token_ids=(), stats=stats) for t in c.tokens]
        assert spec == plain and stats.mean_accepted > 1.0, (spec, plain, stats.mean_accepted)
    print("checked")
''')


FP8_CHECKS = textwrap.dedent('''
    import torch
    from medusa.kernels.fp8_linear import fp8_matmul
    from medusa.model import fp8

    g = torch.Generator().manual_seed(0)
    # (N, K, K chunks): N not a multiple of the column block; split 2 of K = 160 leaves a partial
    # chunk (masked loads), split 4 of K = 512 whole BLOCK_K steps (unmasked)
    for n, k, split in ((96, 160, 1), (96, 160, 2), (64, 512, 4), (80, 256, 1)):
        q, s = fp8.quantize_weight(torch.randn(n, k, generator=g) * 0.02)
        bias = torch.randn(n, generator=g).to(torch.bfloat16)
        w = q.float() * s[:, None]  # the dequantised reference weight
        for m in (1, 3, 16, 33, 64):
            x = torch.randn(m, k, generator=g).to(torch.bfloat16)
            for b in (None, bias):
                got = fp8_matmul(x, q, s, b, tune=False, split=split)
                ref = x.float() @ w.t() + (b.float() if b is not None else 0)
                assert got.dtype == torch.bfloat16 and got.shape == (m, n)
                # float32 accumulation of unrounded products: only the bfloat16 output rounds
                assert (got.float() - ref).abs().max() <= ref.abs().max() / 128, (n, k, split, m)
    x = torch.randn(2, 3, 256, generator=g).to(torch.bfloat16)  # leading dims kept (the last weight: 80 x 256)
    assert fp8_matmul(x, q, s, None, tune=False).shape == (2, 3, 80)
    print("checked")
''')


def _interpreted(script: str) -> None:
    pytest.importorskip("triton")
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    if r.returncode != 0 and "only 0-dimensional arrays can be converted to Python scalars" in r.stderr:
        # Triton 3.6's interpreter passes integer arguments as one-element arrays and reads loop
        # bounds with int(), which newer numpy refuses (seen with numpy 2.4; 2.2 runs it)
        pytest.skip("Triton's interpreter cannot run loops with runtime bounds under this numpy")
    assert r.returncode == 0 and "checked" in r.stdout, r.stderr[-3000:]


def test_topk_kernel_gives_torch_topk_best_first_under_the_interpreter():
    _interpreted(CHECKS)


def test_draft_kernels_equal_their_torch_paths_under_the_interpreter():
    """head_inputs, add_silu and the top-k written into the candidates, one by one and in a
    whole Hydra++ proposal."""
    _interpreted(DRAFT_CHECKS)


def test_accept_kernel_equals_verify_under_the_interpreter():
    """The one-launch accepted path equals verify's torch path: every output, first longest path
    on ties, with and without a cap, on the 1-node tree and searched trees."""
    _interpreted(ACCEPT_CHECKS)


def test_attention_kernel_equals_the_models_attention_under_the_interpreter():
    _interpreted(ATTENTION_CHECKS)


def test_fp8_weight_only_kernel_equals_the_dequantised_matmul_under_the_interpreter():
    """The decode FP8 GEMM (medusa.kernels.fp8_linear) against x @ dequantised W^T (+ bias):
    1..64 rows (every row block), with and without split-K."""
    _interpreted(FP8_CHECKS)


def test_triton_attention_setting_falls_back_where_the_kernel_cannot_run(monkeypatch):
    """MEDUSA_ATTENTION=triton on a CPU (or without Triton) runs auto's path, same outputs."""
    from medusa.decoding.step import attention_mask
    from medusa.kernels import attention_choice
    from tests.conftest import tiny_model

    model = tiny_model(seed=3, vocab=16)
    tokens = torch.randint(0, 16, (2, 5), generator=torch.Generator().manual_seed(4))
    pos = torch.arange(5)[None].expand(2, 5)
    mask = attention_mask(torch.zeros(2, dtype=torch.long), torch.ones(5, 5, dtype=torch.bool).tril(), 8)

    def run(kind):
        monkeypatch.setattr(attention_choice, "ATTENTION", kind)
        attention_choice.check_attention_setting()
        with torch.inference_mode():
            return model(tokens, pos, model.new_cache(2, 8), pos, mask).logits

    assert torch.equal(run("triton"), run("auto"))


def test_torch_fallback_on_cpu_and_when_switched_off(monkeypatch):
    x = torch.randn(3, 100, generator=torch.Generator().manual_seed(2))
    assert not topk_mod._use_kernel(x, 5)  # CPU tensors take torch.topk
    monkeypatch.setenv("MEDUSA_KERNELS", "torch")
    assert not topk_mod._use_kernel(x, 5)
    ids = torch.arange(100).flip(0)
    assert torch.equal(topk_mod.topk_ids(x, 5, ids), ids[x.topk(5, dim=-1).indices])
    assert torch.equal(topk_mod.topk_ids(x, 5), x.topk(5, dim=-1).indices)


def test_split_topk_plan():
    plan = topk_mod.split_plan
    # as measured: rows up to 8,192 columns whole, longer ones in 1,024-wide pieces
    assert [plan(n) for n in (1, 1024, 8192, 8193, 32768, 49152)] == [(1, 1), (1, 1024), (1, 8192), (9, 1024), (32, 1024), (48, 1024)]
    assert plan(49152, 0) == (1, 49152) and plan(1000, 16) == (63, 16) and plan(16, 16) == (1, 16)
    assert topk_mod.MAX_COLUMNS >= 49152  # a whole vocabulary of the default model takes the kernel


@pytest.mark.parametrize("raw", ["abc", "1000", "8", "-4"])
def test_topk_chunk_setting_is_checked(monkeypatch, raw):
    from medusa.errors import ModelLoadError

    with pytest.raises(ValueError, match="MEDUSA_TOPK_CHUNK"):
        topk_mod.chunk_setting(raw)
    monkeypatch.setattr(topk_mod, "CHUNK_SETTING", raw)  # the value read from MEDUSA_TOPK_CHUNK at import
    with pytest.raises(ModelLoadError, match="MEDUSA_TOPK_CHUNK"):  # a one-line user error when a model loads
        topk_mod.check_topk_setting()
    assert topk_mod.chunk_setting("0") == 0 and topk_mod.chunk_setting("512") == 512
