"""Our decoder against HF transformers on the same weights: the default GGUF as our converter
caches it (float16, medusa/model/gguf_convert.py), loaded by transformers in float32, gives
logits within 1e-3 and identical greedy continuations; and that cache holds what transformers'
own GGUF loader reads from the file, within float16 rounding."""
import pytest
import torch

from medusa.decoding.generate import generate
from medusa.decoding.step import attention_mask


@pytest.fixture(scope="module")
def hf_model(stack):
    """transformers' model of the converted cache directory (the weights we run), float32."""
    transformers = pytest.importorskip("transformers")
    transformers.utils.logging.set_verbosity_error()
    return transformers.AutoModelForCausalLM.from_pretrained(str(stack.source.hf_dir), dtype=torch.float32).eval()


def test_gguf_cache_holds_the_files_weights_in_float16(stack):
    """transformers dequantises the GGUF itself (its own q/k un-permutation included); each of
    our cached tensors is that tensor rounded to float16 (relative error <= 2^-11), not float32."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from safetensors import safe_open

    src = stack.source
    assert src.gguf is not None
    transformers.utils.logging.disable_progress_bar()
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(src.gguf.parent), gguf_file=src.gguf.name, dtype=torch.float32).state_dict()
    index = src.hf_dir / "model.safetensors.index.json"
    assert index.is_file() and not (src.hf_dir / "model.safetensors").exists()
    seen = 0
    for f in sorted(src.hf_dir.glob("model-*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                ours = st.get_tensor(key)
                assert ours.dtype in (torch.float16, torch.float32), key
                if ours.dtype == torch.float32:
                    assert ours.dim() == 1, f"{key}: a float32 matrix in the cache"
                r = ref[key]
                tol = r.abs() * 2.0 ** -11 + 1e-7
                assert ((ours.float() - r).abs() <= tol).all(), key
                seen += 1
    assert seen == len([k for k in ref if k != "lm_head.weight" or not stack.model.cfg.tie_word_embeddings])


def test_logits_match_hf(stack, hf_model, mt_prompts):
    for ids in mt_prompts[:3]:
        tokens = torch.tensor([ids])
        T = len(ids)
        with torch.inference_mode():
            ref = hf_model(tokens).logits  # [1, T, V]
            cache = stack.model.new_cache(1, T)
            pos = torch.arange(T)[None]
            mask = attention_mask(torch.zeros(1, dtype=torch.long), torch.ones(T, T, dtype=torch.bool).tril(), T)
            ours = stack.model(tokens, pos, cache, pos, mask).logits
        assert (ours - ref).abs().max().item() < 1e-3


def test_greedy_matches_hf_generate(stack, hf_model, mt_prompts):
    for ids in mt_prompts[:3]:
        with torch.inference_mode():
            ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                                    eos_token_id=list(stack.model.cfg.eos_token_ids), pad_token_id=0)[0, len(ids):].tolist()
        ours = [t for c in generate(stack.model, ids, max_new_tokens=32) for t in c.tokens]
        assert ours == ref
