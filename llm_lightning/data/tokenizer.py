"""Three kinds of tokenizer behind one small interface, trained, saved and loaded offline.

- `bpe`: byte-level BPE (GPT-2 style) with the `tokenizers` library. Any text encodes, there
  is no unknown token, and `decode(encode(x)) == x` exactly.
- `wordpiece`: WordPiece with BERT's normalizer (case and accents kept) and pre-tokenizer,
  and a WordPiece decoder. Round-trips up to that normalization: whitespace is collapsed,
  control characters dropped, and characters never seen in training become `[UNK]`.
- `tiktoken`: a byte-level BPE that the project trains itself with the GPT-4 split pattern,
  served by `tiktoken.Encoding`. Its ranks are laid out the way tiktoken wants them (byte b
  is id b, merged tokens follow in merge order, special tokens after the last rank) and the
  same BPE is also written as a `tokenizers` file that gives identical ids. A named tiktoken
  encoding (cl100k_base, ...) can be used instead when its file is in the local tiktoken
  cache; nothing is ever downloaded.

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

import base64
import json
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

import tiktoken
import tiktoken.load
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizerModel

from llm_lightning.errors import UserError

KINDS = ("bpe", "wordpiece", "tiktoken")
EOS_TOKEN = "<|endoftext|>"
UNK_TOKEN = "[UNK]"  # wordpiece only; byte-level kinds have no unknown token

TOKENIZER_JSON = "tokenizer.json"
META_JSON = "tokenizer_meta.json"
TIKTOKEN_FILE = "tokenizer.tiktoken"
TOKENIZER_FILES = (TOKENIZER_JSON, META_JSON, TIKTOKEN_FILE)
META_FORMAT_VERSION = 1

# The split pattern of tiktoken's cl100k_base (GPT-4): contractions, letter runs with one
# leading non-letter, numbers of at most 3 digits, punctuation runs, and whitespace.
GPT4_SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)

MAX_VOCAB_SIZE = 1_000_000
_MIN_VOCAB_SIZE = {"bpe": 258, "tiktoken": 258, "wordpiece": 100}  # byte-level: 256 bytes + eos + 1


def min_vocab_size(kind: str) -> int:
    return _MIN_VOCAB_SIZE[kind]


def check_vocab_size(kind: str, vocab_size: int) -> None:
    """Raise a UserError when `vocab_size` cannot work for `kind`."""
    check_kind(kind)
    low = min_vocab_size(kind)
    if vocab_size < low:
        why = " (256 byte tokens + <|endoftext|> + merges)" if kind != "wordpiece" else ""
        raise UserError(f"--vocab_size {vocab_size} is too small for {kind}; use at least {low}{why}")
    if vocab_size > MAX_VOCAB_SIZE:
        raise UserError(f"--vocab_size {vocab_size} is absurdly large; use at most {MAX_VOCAB_SIZE:,}")


def check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise UserError(f"--tokenizer_type must be one of {', '.join(KINDS)}, not {kind!r}")


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

    def save(self, directory: str | os.PathLike) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name, text in self.files().items():
            (directory / name).write_text(text, encoding="utf-8")
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


# ---------------------------------------------------------------------------------------------
# Training


def train_tokenizer(kind: str, texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a tokenizer of `kind` on a stream of texts (consumed once, never held whole)."""
    check_vocab_size(kind, vocab_size)
    if kind == "wordpiece":
        hf = HFTokenizerModel(models.WordPiece(unk_token=UNK_TOKEN))
        hf.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=False, lowercase=False
        )
        hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        hf.decoder = decoders.WordPiece(prefix="##", cleanup=True)
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size, special_tokens=[UNK_TOKEN, EOS_TOKEN], show_progress=False
        )
    else:
        split = GPT4_SPLIT_PATTERN if kind == "tiktoken" else None
        hf = _new_byte_level_bpe(split)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOS_TOKEN],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    hf.train_from_iterator(texts, trainer)
    if kind == "tiktoken":
        return _tiktoken_from_trained(hf)
    return HFTokenizer(kind, hf)


def _new_byte_level_bpe(split_pattern: str | None, model=None) -> HFTokenizerModel:
    """A byte-level BPE; GPT-2's split regex, or `split_pattern` applied before the byte mapping."""
    hf = HFTokenizerModel(model or models.BPE())
    if split_pattern is None:
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        hf.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split_pattern), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    hf.decoder = decoders.ByteLevel()
    return hf


def _tiktoken_from_trained(hf: HFTokenizerModel) -> TiktokenTokenizer:
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
    hf = _new_byte_level_bpe(oniguruma_pattern(pat_str), model)
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


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE in `tokenizers`.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes are mapped, in order, to
    the characters from U+0100 on.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


# ---------------------------------------------------------------------------------------------
# Named tiktoken encodings (offline only)


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
    import tempfile

    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


# ---------------------------------------------------------------------------------------------
# Loading


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
    if kind != "tiktoken":
        return HFTokenizer(kind, HFTokenizerModel.from_str(files[TOKENIZER_JSON]))
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
