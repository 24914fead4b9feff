"""Reading the corpus: the input files as pieces, the seeded train/val split, the tokenizer, shards.

Each piece (a document, or a block of a long one) goes to train or val by a seeded hash of
its position (file, document, block), before any windowing, so no val text is ever in a train
window, and adding or removing a file does not reshuffle the split of the others. The
tokenizer is trained on a seeded sample of the train pieces, capped at
`--tokenizer_train_chars` characters, spread over the whole corpus rather than its first files
(the sampling rate counts compressed files at their estimated text size).

Shard I of N (`--num_shards N --shard_index I`) reads a contiguous run of the sorted files, the
runs cut so that each holds about 1/N of the corpus's text and at least one file; with fewer
files than shards it reads every file and keeps document d of file f when (f + d) % N == I.
Both depend only on the list of files and their sizes, so the N jobs of an array agree without
talking to each other, and the split of a piece is the same hash as in one prepare: the shards
together hold exactly the pieces, splits and (cut by file) token order of a single prepare.
"""

from __future__ import annotations

import bisect
import hashlib
import os
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path

from llm_lightning.data.prepare.options import DEFAULT_VOCAB_SIZE, PrepareOptions, default_block_chars
from llm_lightning.data.prepare.progress import progress_bar
from llm_lightning.data.sources import Piece, estimated_text_bytes, iter_pieces
from llm_lightning.data.tokenizers import Tokenizer, load_tiktoken_encoding, load_tokenizer, train_tokenizer
from llm_lightning.errors import UserError


class Corpus:
    """The input files as pieces, with the seeded per-piece decisions made on them."""

    def __init__(self, input_dir: Path, files: list[str], opts: PrepareOptions):
        self.input_dir, self.files, self.opts = input_dir, files, opts
        self.block_chars = opts.block_chars or default_block_chars(opts.max_length)
        self.shard: dict | None = None  # for metadata.json: which shard, how cut, of which corpus
        self._keep_document = None  # by-document sharding: which (file, document) this shard keeps
        if opts.num_shards is not None:
            self._take_shard(opts.shard_index, opts.num_shards)
        # For progress only; a file that cannot be read is reported (or skipped) when it is read.
        self.total_bytes = sum(_size(input_dir / name) for name in self.files)
        self.skipped: list[dict] = []  # filled by the encoding pass (the one that counts)

    @cached_property
    def text_bytes(self) -> int:
        """About how much text the files hold (compressed ones estimated): the sampling rate's base."""
        return sum(self._text_sizes(self.files))

    def _text_sizes(self, files: list[str]) -> list[int]:
        return [estimated_text_bytes(self.input_dir / name, self.opts.text_field) for name in files]

    def _take_shard(self, index: int, count: int) -> None:
        listing = hashlib.blake2b(digest_size=8)  # the corpus every shard must have seen
        for name in self.files:
            listing.update(f"{name}\0{_size(self.input_dir / name)}\0".encode())
        self.shard = {
            "index": index,
            "count": count,
            "corpus": listing.hexdigest(),
            "corpus_files": len(self.files),
        }
        if len(self.files) < count:
            numbers = {name: number for number, name in enumerate(self.files)}
            self._keep_document = lambda piece: (numbers[piece.source] + piece.doc) % count == index
            self.shard["by"] = "document"
        else:
            bounds = shard_bounds(self._text_sizes(self.files), count)
            self.files = self.files[bounds[index] : bounds[index + 1]]
            self.shard["by"] = "file"

    def pieces(self, record_skipped: bool = True) -> Iterator[Piece]:
        pieces = iter_pieces(
            self.input_dir,
            self.files,
            text_field=self.opts.text_field,
            on_bad_input=self.opts.on_bad_input,
            skipped=self.skipped if record_skipped else [],
            block_chars=self.block_chars,
        )
        return pieces if self._keep_document is None else filter(self._keep_document, pieces)

    def _uniform(self, salt: str, piece: Piece) -> float:
        # Keyed by file, document and block (not by a running count), so adding or removing a
        # file does not reshuffle the split of the others.
        key = f"{self.opts.seed}\0{salt}\0{piece.source}\0{piece.doc}\0{piece.part}".encode()
        return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") / 2**64

    def is_val(self, piece: Piece) -> bool:
        return self._uniform("val", piece) < self.opts.val_fraction

    def sampled(self, piece: Piece, probability: float) -> bool:
        return probability >= 1 or self._uniform("tokenizer", piece) < probability


def get_tokenizer(kind: str, corpus: Corpus, opts: PrepareOptions) -> tuple[Tokenizer, dict]:
    """Load or train the tokenizer; also return how it was obtained (for metadata.json)."""
    if opts.tokenizer is not None:
        tok = load_tokenizer(opts.tokenizer)
        if kind and kind != tok.kind:
            raise UserError(
                f"--tokenizer {opts.tokenizer} is a {tok.kind} tokenizer, not {kind}; drop --tokenizer_type"
            )
        return tok, {"source": "loaded", "path": str(Path(opts.tokenizer).resolve())}
    if opts.tiktoken_encoding is not None:
        return load_tiktoken_encoding(opts.tiktoken_encoding), {
            "source": "tiktoken",
            "name": opts.tiktoken_encoding,
        }

    # Sample pieces evenly over the whole corpus rather than taking its first files.
    budget = opts.tokenizer_train_chars
    probability = min(1.0, budget / max(corpus.text_bytes, 1))
    read_chars = 0
    bar = progress_bar(corpus.total_bytes, "reading for the tokenizer", opts.progress)

    def texts() -> Iterator[str]:
        nonlocal read_chars
        for piece in corpus.pieces(record_skipped=False):  # bad input raises here, before encoding
            bar.update(piece.nbytes)
            if corpus.is_val(piece) or not corpus.sampled(piece, probability):
                continue
            yield piece.text
            read_chars += len(piece.text)
            if read_chars >= budget:
                return

    try:
        tok = train_tokenizer(kind, texts(), opts.vocab_size or DEFAULT_VOCAB_SIZE)
    finally:
        bar.close()
    if read_chars == 0:
        raise UserError(
            f"--input_dir {corpus.input_dir} has no text in its train split to train a tokenizer on"
        )
    return tok, {"source": "trained", "trained_on_chars": read_chars}


def shard_bounds(sizes: list[int], count: int) -> list[int]:
    """Cut points 0 = b_0 < b_1 < ... < b_count = len(sizes): `count` contiguous runs of about equal
    total size, each at least one item long (needs len(sizes) >= count)."""
    starts = [0]
    for size in sizes:
        starts.append(starts[-1] + size)
    total, bounds = starts[-1], [0]
    for k in range(1, count):
        # the first item that starts at or after k/count of the total (compared as integers)
        cut = bisect.bisect_left(starts, -(-total * k // count))
        bounds.append(min(max(cut, bounds[-1] + 1), len(sizes) - (count - k)))
    return [*bounds, len(sizes)]


def _size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0
