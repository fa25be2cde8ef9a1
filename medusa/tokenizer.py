"""Text <-> token ids for a loaded model: the HF tokenizer of the checkpoint directory (for a
GGUF, built once from the file's own vocabulary and saved beside the converted weights), the
chat template, and incremental detokenisation for streaming.

The engine never sees text; only the CLI, the benchmarks and the tokenizer service use this."""
from __future__ import annotations

from dataclasses import dataclass, field

from medusa.errors import ModelLoadError, RequestError
from medusa.model.loading import ModelSource


def _load_hf_tokenizer(src: ModelSource):
    import transformers

    transformers.utils.logging.set_verbosity_error()
    from transformers import AutoTokenizer

    try:
        if (src.hf_dir / "tokenizer.json").is_file() or (src.hf_dir / "tokenizer_config.json").is_file():
            return AutoTokenizer.from_pretrained(str(src.hf_dir))
        if src.gguf is not None:
            tok = AutoTokenizer.from_pretrained(str(src.gguf.parent), gguf_file=src.gguf.name)
            tok.save_pretrained(str(src.hf_dir))  # so later loads skip the GGUF conversion
            return tok
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load a tokenizer for {src.name}: {e}") from None
    raise ModelLoadError(f"{src.hf_dir} has no tokenizer (tokenizer.json expected)")


@dataclass
class Tokenizer:
    hf: object  # a transformers tokenizer

    @classmethod
    def load(cls, src: ModelSource) -> "Tokenizer":
        return cls(_load_hf_tokenizer(src))

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        ids = {self.hf.eos_token_id} if self.hf.eos_token_id is not None else set()
        for t in ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "</s>"):
            i = self.hf.convert_tokens_to_ids(t)
            if isinstance(i, int) and i != self.hf.unk_token_id and i is not None:
                ids.add(i)
        return tuple(sorted(ids))

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False))

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Apply the chat template (with the assistant turn opened) and tokenise."""
        if not self.has_chat_template:
            raise RequestError("this model has no chat template: use --no-chat (raw prompt)")
        for m in messages:
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
                raise RequestError("chat messages need a role (system, user, assistant) and text content")
        text = self.hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.encode(text)

    def encode_prompt(self, prompt: str, chat: bool = True) -> list[int]:
        return self.encode_chat([{"role": "user", "content": prompt}]) if chat else self.encode(prompt)

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True)

    def token_text(self, token_id: int) -> str:
        """One token's text alone, special tokens included (a piece of a multi-byte character
        decodes to U+FFFD): the `token` of per-token log-probabilities."""
        return self.hf.decode([token_id], skip_special_tokens=False)

    def stream(self) -> "StreamDecoder":
        return StreamDecoder(self)


@dataclass
class StreamDecoder:
    """Turns a growing list of token ids into text deltas, holding back an incomplete UTF-8
    sequence (a trailing U+FFFD) until the token that completes it arrives."""

    tok: Tokenizer
    ids: list[int] = field(default_factory=list)
    emitted: int = 0  # characters of decode(ids) already returned

    def push(self, new_ids: list[int]) -> str:
        self.ids.extend(new_ids)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        delta, self.emitted = text[self.emitted:], len(text)
        return delta

    def flush(self) -> str:
        text = self.tok.decode(self.ids)
        delta, self.emitted = text[self.emitted:], len(text)
        return delta
