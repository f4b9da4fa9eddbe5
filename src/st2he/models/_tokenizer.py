"""A self-contained word tokenizer for the small text encoders of the ``tiny`` and ``small`` configs.

SD-Turbo's CLIP tokenizer needs its BPE vocabulary files (``vocab.json``, ``merges.txt``), which ship with SD-Turbo's
weights, not with st2he. The small models st2he trains from scratch have their own small CLIP text encoders
(``transformers.CLIPTextModel``), so they need a tokenizer that is defined entirely by a few numbers stored in the
model config: :class:`HashingWordTokenizer` lower-cases the prompt, splits it into words and punctuation marks and
maps each to ``2 + crc32(word) % (vocab_size - 2)`` (ids 0 and 1 are start and end / padding, as CLIP's layout).
It is deterministic across runs and machines. Distinct words can share an id (a hash collision); with a 4096-word
table and prompts of a few words that is rare, and a model only ever learns the prompts it was trained with anyway:
a tissue name it never saw during training is a new, untrained conditioning signal, so prefer the prompt the model
records (``model.prompt``).
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

import torch

_WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


@dataclass
class TokenizerOutput:
    """What the tokenizer returns (the attribute the models read, as in transformers)."""

    input_ids: torch.Tensor


class HashingWordTokenizer:
    """Deterministic word-hashing tokenizer with CLIP's call signature (see the module docstring)."""

    bos_token_id = 0
    eos_token_id = 1
    pad_token_id = 1

    def __init__(self, vocab_size: int, model_max_length: int) -> None:
        if vocab_size < 3 or model_max_length < 2:
            msg = f"vocab_size must be >= 3 and model_max_length >= 2, got {vocab_size}, {model_max_length}."
            raise ValueError(msg)
        self.vocab_size = int(vocab_size)
        self.model_max_length = int(model_max_length)

    def tokenize(self, text: str) -> list[str]:
        """Words and punctuation marks of ``text``, lower-cased."""
        return _WORD.findall(text.lower())

    def encode(self, text: str) -> list[int]:
        """Ids of ``text``: start, words, end, padded / truncated to ``model_max_length``."""
        words = [2 + zlib.crc32(w.encode("utf-8")) % (self.vocab_size - 2) for w in self.tokenize(text)]
        ids = [self.bos_token_id, *words[: self.model_max_length - 2], self.eos_token_id]
        return ids + [self.pad_token_id] * (self.model_max_length - len(ids))

    def __call__(self, text: str | list[str], **kwargs) -> TokenizerOutput:
        texts = [text] if isinstance(text, str) else list(text)
        return TokenizerOutput(torch.tensor([self.encode(t) for t in texts], dtype=torch.long))

    def to_config(self) -> dict:
        """Return the config entry that rebuilds this tokenizer."""
        return {"type": "hashing-word", "vocab_size": self.vocab_size, "model_max_length": self.model_max_length}

    def __repr__(self) -> str:
        return f"HashingWordTokenizer(vocab_size={self.vocab_size}, model_max_length={self.model_max_length})"


def build_tokenizer(spec: dict):
    """Build the tokenizer a config describes (only ``hashing-word`` is self-contained)."""
    kind = spec.get("type")
    if kind == "hashing-word":
        return HashingWordTokenizer(spec["vocab_size"], spec["model_max_length"])
    msg = f"Unknown tokenizer type {kind!r} in the model config (st2he builds 'hashing-word' tokenizers itself)."
    raise ValueError(msg)
