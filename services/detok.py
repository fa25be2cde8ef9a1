"""Incremental detokenisation: the text that new token ids add to a stream, holding back an
incomplete UTF-8 character, and a light decoder built from a fast tokenizer's JSON (the
`tokenizers` library only: no transformers, no torch) for streaming next to the ingress.

Knows nothing of where ids or tokenizers come from."""
from __future__ import annotations


def decode_delta(tok, ids: list[int], prefix_offset: int, read_offset: int,
                 final: bool = False) -> tuple[str, int, int]:
    """New text for ids[read_offset:], decoding from prefix_offset so that tokens which change
    how earlier ones render (leading spaces, multi-byte characters) come out right. Returns
    (text, new prefix_offset, new read_offset); text is "" while a character is incomplete
    (unless final, which flushes whatever is left). `tok` needs decode(ids) -> str."""
    prefix = tok.decode(ids[prefix_offset:read_offset])
    full = tok.decode(ids[prefix_offset:])
    if len(full) > len(prefix) and (final or not full.endswith("\ufffd")):
        return full[len(prefix):], read_offset, len(ids)
    return "", prefix_offset, read_offset


class JsonDecoder:
    """decode(ids) of a fast tokenizer given as its tokenizer.json text (special tokens skipped,
    as medusa.tokenizer.Tokenizer.decode does)."""

    def __init__(self, tokenizer_json: str):
        from tokenizers import Tokenizer

        self._tk = Tokenizer.from_str(tokenizer_json)

    def decode(self, ids: list[int]) -> str:
        return self._tk.decode(ids, skip_special_tokens=True)

    def token_text(self, token_id: int) -> str:
        """One token's text alone (special tokens included), as Tokenizer.token_text."""
        return self._tk.decode([token_id], skip_special_tokens=False)
