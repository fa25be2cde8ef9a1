"""Our decoder against HF transformers on the same weights (the default GGUF, dequantised by
transformers' own loader, float32): logits within 1e-3 and identical greedy continuations."""
import pytest
import torch

from medusa.decoding.generate import generate
from medusa.decoding.step import attention_mask


@pytest.fixture(scope="module")
def hf_model(stack):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    src = stack.source
    assert src.gguf is not None
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(src.gguf.parent), gguf_file=src.gguf.name, dtype=torch.float32).eval()


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
