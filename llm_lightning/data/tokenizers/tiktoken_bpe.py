"""`tiktoken`: a byte-level BPE the project trains itself, served by `tiktoken.Encoding`.

It is trained with the GPT-4 split pattern, and its ranks are laid out the way tiktoken wants
them (byte b is id b, merged tokens follow in merge order, special tokens after the last rank);
the same BPE is also written as a `tokenizers` file that gives identical ids. A named tiktoken
encoding (cl100k_base, ...) can be used instead when its file is in the local tiktoken cache;
nothing is ever downloaded.
"""

from __future__ import annotations

import base64
import json
import os
import re
import tempfile
from collections.abc import Iterable
from contextlib import contextmanager

import tiktoken
import tiktoken.load
from tokenizers import AddedToken, models
from tokenizers import Tokenizer as HFTokenizerModel

from llm_lightning.data.tokenizers.base import EOS_TOKEN, META_JSON, TIKTOKEN_FILE, TOKENIZER_JSON, Tokenizer
from llm_lightning.data.tokenizers.bpe import bytes_to_unicode, new_byte_level_bpe, train_byte_level_bpe
from llm_lightning.errors import UserError

# The split pattern of tiktoken's cl100k_base (GPT-4): contractions, letter runs with one
# leading non-letter, numbers of at most 3 digits, punctuation runs, and whitespace.
GPT4_SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)


class TiktokenTokenizer(Tokenizer):
    """A byte-level BPE served by `tiktoken.Encoding`, with a `tokenizers` twin for export."""

    kind = "tiktoken"

    def __init__(
        self,
        name: str,
        ranks: dict[bytes, int],
        special_tokens: dict[str, int],
        pat_str: str,
        hf_json: str | None = None,
        merges: list[tuple[bytes, bytes]] | None = None,
    ):
        if EOS_TOKEN not in special_tokens:
            raise UserError(f"tiktoken encoding {name!r} has no {EOS_TOKEN} token; it cannot be used here")
        self.name, self.ranks, self.special_tokens, self.pat_str = name, ranks, special_tokens, pat_str
        self.encoding = tiktoken.Encoding(
            name, pat_str=pat_str, mergeable_ranks=ranks, special_tokens=special_tokens
        )
        self._hf_json, self._merges = hf_json, merges

    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab

    @property
    def eos_id(self) -> int:
        return self.special_tokens[EOS_TOKEN]

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # One thread on purpose: prepare runs one tokenizer per worker process.
        return [self.encoding.encode_ordinary(text) for text in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return self.encoding.decode(list(ids))

    def hf_tokenizer(self) -> HFTokenizerModel:
        """The same BPE as a `tokenizers.Tokenizer` (built on first use; slow for big vocabularies)."""
        if self._hf_json is None:
            merges = self._merges if self._merges is not None else derive_merges(self.ranks)
            hf = _byte_level_bpe(self.ranks, merges, self.special_tokens, self.pat_str)
            self._hf_json = hf.to_str(pretty=True)
        hf = HFTokenizerModel.from_str(self._hf_json)
        hf.encode_special_tokens = True
        return hf

    def files(self) -> dict[str, str]:
        self.hf_tokenizer()  # makes sure the twin exists
        ranks = "".join(
            f"{base64.b64encode(token).decode('ascii')} {rank}\n"
            for token, rank in sorted(self.ranks.items(), key=lambda item: item[1])
        )
        extra = {
            "tiktoken": {"name": self.name, "pat_str": self.pat_str, "special_tokens": self.special_tokens}
        }
        return {TOKENIZER_JSON: self._hf_json, META_JSON: self._meta(**extra), TIKTOKEN_FILE: ranks}


def train_tiktoken(texts: Iterable[str], vocab_size: int) -> TiktokenTokenizer:
    """Train a byte-level BPE with the GPT-4 split pattern and lay it out as tiktoken ranks."""
    return tiktoken_from_trained(train_byte_level_bpe(texts, vocab_size, GPT4_SPLIT_PATTERN))


def tiktoken_from_trained(hf: HFTokenizerModel) -> TiktokenTokenizer:
    """Re-lay a trained byte-level BPE as tiktoken ranks: byte b -> b, then merges in order."""
    byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
    model = json.loads(hf.to_str())["model"]
    ranks = {bytes([b]): b for b in range(256)}
    merges = []
    for left, right in model["merges"]:
        a, b = (bytes(byte_of[c] for c in part) for part in (left, right))
        if a + b in ranks:  # two merges giving one token cannot be expressed as ranks; keep the first
            continue
        ranks[a + b] = len(ranks)
        merges.append((a, b))
    special_tokens = {EOS_TOKEN: len(ranks)}
    twin = _byte_level_bpe(ranks, merges, special_tokens, GPT4_SPLIT_PATTERN)
    return TiktokenTokenizer(
        "llm-lightning", ranks, special_tokens, GPT4_SPLIT_PATTERN, hf_json=twin.to_str(pretty=True)
    )


def _byte_level_bpe(
    ranks: dict[bytes, int],
    merges: list[tuple[bytes, bytes]],
    special_tokens: dict[str, int],
    pat_str: str,
) -> HFTokenizerModel:
    """The `tokenizers` twin of a tiktoken BPE, giving the same ids.

    `ignore_merges=True` mirrors tiktoken, which takes a whole pre-token as one token when it
    is in the vocabulary before trying merges. Special tokens sit in the vocabulary at their
    tiktoken ids (which may leave gaps, as in cl100k_base).
    """
    char_of = bytes_to_unicode()

    def to_str(token: bytes) -> str:
        return "".join(char_of[b] for b in token)

    vocab = {to_str(token): rank for token, rank in ranks.items()}
    vocab.update(special_tokens)
    hf_merges = [(to_str(a), to_str(b)) for a, b in merges]
    model = models.BPE(vocab=vocab, merges=hf_merges, ignore_merges=True)
    hf = new_byte_level_bpe(oniguruma_pattern(pat_str), model)
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens])
    return hf


def oniguruma_pattern(pat_str: str) -> str:
    r"""tiktoken's regex (Rust fancy-regex) rewritten for `tokenizers` (Oniguruma, Ruby syntax).

    The one difference that matters for tiktoken's patterns: a possessive counted repeat such
    as `\p{N}{1,3}+` means `(\p{N}{1,3})+` to Oniguruma, so "2024" would stay one piece. It
    is written as the equivalent atomic group `(?>\p{N}{1,3})`. (`?+`, `*+` and `++` are
    possessive in both; `$` after `\s++` can only match at the end of the text in both.)
    """
    atom = r"(\\p\{\w+\}|\\P\{\w+\}|\[[^\]]*\]|\\.|[^\\])"
    return re.sub(atom + r"(\{\d+(?:,\d*)?\})\+", r"(?>\1\2)", pat_str)


def derive_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge list of a tiktoken rank table: for each token, the pair BPE joins last to make it."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) < 2:
            continue
        parts = _bpe(token, ranks, below=rank)
        if len(parts) == 2:
            merges.append((parts[0], parts[1]))
    return merges


def _bpe(token: bytes, ranks: dict[bytes, int], below: int) -> list[bytes]:
    """Byte-pair encode `token` using only ranks lower than `below` (tiktoken's algorithm)."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        best_rank, best_at = below, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best_rank, best_at = rank, i
        if best_at < 0:
            break
        parts[best_at : best_at + 2] = [parts[best_at] + parts[best_at + 1]]
    return parts


def load_tiktoken_encoding(name: str) -> TiktokenTokenizer:
    """A named tiktoken encoding (cl100k_base, ...) if its file is in the local tiktoken cache."""
    known = tiktoken.list_encoding_names()
    if name not in known:
        raise UserError(f"--tiktoken_encoding {name!r} is not a tiktoken encoding; known: {', '.join(known)}")
    try:
        with _no_downloads():
            encoding = tiktoken.get_encoding(name)
    except _NotCached as missing:
        raise UserError(
            f"--tiktoken_encoding {name}: its file ({missing}) is not in the tiktoken cache "
            f"{_tiktoken_cache_dir()} and nothing is downloaded; copy the cached file there "
            "(or set TIKTOKEN_CACHE_DIR), or drop --tiktoken_encoding to train a tiktoken tokenizer"
        ) from None
    # tiktoken has no public accessor for these; they are plain attributes of Encoding.
    return TiktokenTokenizer(name, encoding._mergeable_ranks, encoding._special_tokens, encoding._pat_str)


class _NotCached(Exception):
    pass


@contextmanager
def _no_downloads():
    """Make tiktoken fail instead of downloading an encoding file that is not cached."""
    original = tiktoken.load.read_file

    def read_local_only(blobpath: str) -> bytes:
        if "://" in blobpath:
            raise _NotCached(blobpath)
        return original(blobpath)

    tiktoken.load.read_file = read_local_only
    try:
        yield
    finally:
        tiktoken.load.read_file = original


def _tiktoken_cache_dir() -> str:
    for variable in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if variable in os.environ:
            return os.environ[variable]
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def tiktoken_from_files(files: dict[str, str], meta: dict) -> TiktokenTokenizer:
    info = meta["tiktoken"]
    return TiktokenTokenizer(
        info["name"],
        parse_tiktoken_ranks(files[TIKTOKEN_FILE]),
        {token: int(i) for token, i in info["special_tokens"].items()},
        info["pat_str"],
        hf_json=files[TOKENIZER_JSON],
    )


def parse_tiktoken_ranks(text: str) -> dict[bytes, int]:
    """Read tiktoken's rank-file format: "base64(token) rank" per line."""
    ranks = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
        except ValueError:
            raise UserError(f"{TIKTOKEN_FILE} line {number} is malformed; save the tokenizer again") from None
    return ranks
