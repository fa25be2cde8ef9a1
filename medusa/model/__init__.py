"""The base model: a compact Llama-family decoder, its static KV cache, and weight loading.

Knows nothing of draft heads, trees or acceptance: it runs tokens at positions under a mask."""
from medusa.model.config import ModelConfig
from medusa.model.kv_cache import KVCache
from medusa.model.llama import Transformer
from medusa.model.loading import load_model

__all__ = ["ModelConfig", "KVCache", "Transformer", "load_model"]
