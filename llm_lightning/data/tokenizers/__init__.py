"""Three kinds of tokenizer behind one small interface, trained, saved and loaded offline.

- `bpe` (bpe.py): byte-level BPE, GPT-2 style; lossless.
- `wordpiece` (wordpiece.py): BERT-style WordPiece; lossless up to BERT's normalization.
- `tiktoken` (tiktoken_bpe.py): a byte-level BPE served by `tiktoken.Encoding`, or a named
  tiktoken encoding found in the local cache.

base.py holds the interface (`Tokenizer`), the end-of-text token and the folder's file names;
this module trains (`train_tokenizer`) and loads (`load_tokenizer`) any kind.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizerModel

from llm_lightning.data.tokenizers.base import (
    EOS_TOKEN,
    KINDS,
    META_JSON,
    TIKTOKEN_FILE,
    TOKENIZER_FILES,
    TOKENIZER_JSON,
    UNK_TOKEN,
    HFTokenizer,
    Tokenizer,
    check_kind,
    check_vocab_size,
    fingerprint,
    min_vocab_size,
)
from llm_lightning.data.tokenizers.bpe import train_byte_level_bpe
from llm_lightning.data.tokenizers.tiktoken_bpe import (
    TiktokenTokenizer,
    load_tiktoken_encoding,
    tiktoken_from_files,
    train_tiktoken,
)
from llm_lightning.data.tokenizers.wordpiece import train_wordpiece
from llm_lightning.errors import UserError

__all__ = [
    "EOS_TOKEN",
    "KINDS",
    "UNK_TOKEN",
    "HFTokenizer",
    "TiktokenTokenizer",
    "Tokenizer",
    "check_kind",
    "check_vocab_size",
    "fingerprint",
    "load_tiktoken_encoding",
    "load_tokenizer",
    "load_tokenizer_from_files",
    "min_vocab_size",
    "tokenizer_files",
    "train_tokenizer",
]


def train_tokenizer(kind: str, texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a tokenizer of `kind` on a stream of texts (consumed once, never held whole)."""
    check_vocab_size(kind, vocab_size)
    if kind == "tiktoken":
        return train_tiktoken(texts, vocab_size)
    if kind == "wordpiece":
        return HFTokenizer(kind, train_wordpiece(texts, vocab_size))
    return HFTokenizer(kind, train_byte_level_bpe(texts, vocab_size))


def tokenizer_files(directory: str | os.PathLike) -> dict[str, str]:
    """File name -> text of every tokenizer file in `directory` (for embedding in a checkpoint)."""
    directory = Path(directory)
    if not (directory / META_JSON).is_file():
        raise UserError(
            f"{directory} has no {META_JSON}; point at the output folder of an earlier "
            "`llm-lightning prepare` or a folder a tokenizer was saved to"
        )
    return {
        name: (directory / name).read_text(encoding="utf-8")
        for name in TOKENIZER_FILES
        if (directory / name).is_file()
    }


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """The tokenizer saved in `directory` (a prepare output or a tokenizer folder)."""
    try:
        return load_tokenizer_from_files(tokenizer_files(directory))
    except UserError as error:
        if str(directory) in str(error):
            raise
        raise UserError(f"{directory}: {error}") from None


def load_tokenizer_from_files(files: dict[str, str]) -> Tokenizer:
    """Rebuild a tokenizer from the texts `tokenizer_files` or `Tokenizer.files` returned."""
    try:
        meta = json.loads(files[META_JSON])
        kind = meta["kind"]
    except (KeyError, json.JSONDecodeError, TypeError):
        raise UserError(f"{META_JSON} is missing or unreadable; save the tokenizer again") from None
    check_kind(kind)
    needed = (TOKENIZER_JSON, TIKTOKEN_FILE) if kind == "tiktoken" else (TOKENIZER_JSON,)
    missing = [name for name in needed if name not in files]
    if missing:
        raise UserError(f"the {kind} tokenizer lacks {', '.join(missing)}; save the tokenizer again")
    if kind == "tiktoken":
        return tiktoken_from_files(files, meta)
    return HFTokenizer(kind, HFTokenizerModel.from_str(files[TOKENIZER_JSON]))
