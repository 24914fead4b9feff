"""What every tokenizer kind shares: the interface, the end-of-text token, the folder's files.

Every kind has the end-of-text token `<|endoftext|>` (`eos_id`). `encode` treats text as
plain text: a literal "<|endoftext|>" in a document is encoded as ordinary characters, so only
the data pipeline puts end-of-text ids into a token stream.

Files in a tokenizer folder (the top level of a prepare output):
- `tokenizer.json`: a Hugging Face `tokenizers` file for every kind, loadable with
  `tokenizers.Tokenizer.from_file` or `transformers.PreTrainedTokenizerFast(tokenizer_file=...)`.
  It gives our ids for plain text; note that Hugging Face matches "<|endoftext|>" written in the
  text as the special token unless `encode_special_tokens` is set.
- `tokenizer_meta.json`: which kind, the end-of-text token and id, the vocabulary size.
- `tokenizer.tiktoken` (tiktoken kind only): the ranks in tiktoken's own format, one
  "base64(token bytes) rank" per line, readable by `tiktoken.load.load_tiktoken_bpe`.
"""

from __future__ import annotations

import hashlib
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizerModel

from llm_lightning.errors import UserError
from llm_lightning.io.atomic import write_text

KINDS = ("bpe", "wordpiece", "tiktoken")
EOS_TOKEN = "<|endoftext|>"
UNK_TOKEN = "[UNK]"  # wordpiece only; byte-level kinds have no unknown token

TOKENIZER_JSON = "tokenizer.json"
META_JSON = "tokenizer_meta.json"
TIKTOKEN_FILE = "tokenizer.tiktoken"
TOKENIZER_FILES = (TOKENIZER_JSON, META_JSON, TIKTOKEN_FILE)
META_FORMAT_VERSION = 1

MAX_VOCAB_SIZE = 1_000_000
_MIN_VOCAB_SIZE = {"bpe": 258, "tiktoken": 258, "wordpiece": 100}  # byte-level: 256 bytes + eos + 1


def min_vocab_size(kind: str) -> int:
    return _MIN_VOCAB_SIZE[kind]


def check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise UserError(f"--tokenizer_type must be one of {', '.join(KINDS)}, not {kind!r}")


def check_vocab_size(kind: str, vocab_size: int) -> None:
    """Raise a UserError when `vocab_size` cannot work for `kind`."""
    check_kind(kind)
    low = min_vocab_size(kind)
    if vocab_size < low:
        why = " (256 byte tokens + <|endoftext|> + merges)" if kind != "wordpiece" else ""
        raise UserError(f"--vocab_size {vocab_size} is too small for {kind}; use at least {low}{why}")
    if vocab_size > MAX_VOCAB_SIZE:
        raise UserError(f"--vocab_size {vocab_size} is absurdly large; use at most {MAX_VOCAB_SIZE:,}")


def fingerprint(files: dict[str, str]) -> str:
    """A short hash of a tokenizer's files: two tokenizers with the same one give the same ids."""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + files[name].encode("utf-8") + b"\0")
    return digest.hexdigest()[:16]


class Tokenizer(ABC):
    """What the rest of the project needs from a tokenizer, whatever its kind."""

    kind: str

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Largest id + 1 (the embedding table size)."""

    @property
    @abstractmethod
    def eos_id(self) -> int:
        """Id of `<|endoftext|>`, placed after every document."""

    @abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abstractmethod
    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

    @abstractmethod
    def decode(self, ids: Iterable[int]) -> str: ...

    @abstractmethod
    def files(self) -> dict[str, str]:
        """File name -> file text: everything `load_tokenizer_from_files` needs."""

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.files())

    def save(self, directory: str | os.PathLike) -> Path:
        directory = Path(directory)
        for name, text in self.files().items():
            write_text(directory / name, text)
        return directory

    def _meta(self, **extra) -> str:
        meta = {
            "format_version": META_FORMAT_VERSION,
            "kind": self.kind,
            "eos_token": EOS_TOKEN,
            "eos_id": self.eos_id,
            "vocab_size": self.vocab_size,
            **extra,
        }
        return json.dumps(meta, indent=2) + "\n"

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(kind={self.kind!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"
        )


class HFTokenizer(Tokenizer):
    """bpe and wordpiece: a `tokenizers.Tokenizer`."""

    def __init__(self, kind: str, hf: HFTokenizerModel):
        self.kind, self.hf = kind, hf
        hf.encode_special_tokens = True  # "<|endoftext|>" in a document is plain text
        eos = hf.token_to_id(EOS_TOKEN)
        if eos is None:
            raise UserError(f"the {kind} tokenizer has no {EOS_TOKEN} token; train it again with prepare")
        self._eos_id = eos
        self._vocab_size = max(hf.get_vocab(with_added_tokens=True).values()) + 1

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eos_id(self) -> int:
        return self._eos_id

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # The "fast" variant skips computing character offsets, which we never use.
        return [e.ids for e in self.hf.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def files(self) -> dict[str, str]:
        return {TOKENIZER_JSON: self.hf.to_str(pretty=True), META_JSON: self._meta()}
