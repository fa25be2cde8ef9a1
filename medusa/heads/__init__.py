"""Draft heads that guess the tokens after the next one from the base model's hidden state.

Knows the base model only through its hidden size, vocabulary, embedding and LM head;
knows nothing of trees' acceptance or of the KV cache layout."""
from medusa.heads.base import DraftHeads, HeadsConfig
from medusa.heads.io import fingerprint, load_heads, save_heads
from medusa.heads.medusa import MedusaHeads

__all__ = ["DraftHeads", "HeadsConfig", "MedusaHeads", "fingerprint", "load_heads", "save_heads"]
