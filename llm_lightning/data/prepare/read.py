"""Reading the corpus: the input files as pieces, the seeded train/val split, the tokenizer.

Each piece (a document, or a block of a long one) goes to train or val by a seeded hash of
its position (file, document, block), before any windowing, so no val text is ever in a train
window, and adding or removing a file does not reshuffle the split of the others. The
tokenizer is trained on a seeded sample of the train pieces, capped at
`--tokenizer_train_chars` characters, spread over the whole corpus rather than its first files.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

from llm_lightning.data.prepare.options import DEFAULT_VOCAB_SIZE, PrepareOptions, default_block_chars
from llm_lightning.data.prepare.progress import progress_bar
from llm_lightning.data.sources import Piece, iter_pieces
from llm_lightning.data.tokenizers import Tokenizer, load_tiktoken_encoding, load_tokenizer, train_tokenizer
from llm_lightning.errors import UserError


class Corpus:
    """The input files as pieces, with the seeded per-piece decisions made on them."""

    def __init__(self, input_dir: Path, files: list[str], opts: PrepareOptions):
        self.input_dir, self.files, self.opts = input_dir, files, opts
        self.block_chars = opts.block_chars or default_block_chars(opts.max_length)
        # For progress and the tokenizer's sampling rate only; a file that cannot be read is
        # reported (or skipped) when it is read.
        self.total_bytes = sum(_size(input_dir / name) for name in files)
        self.skipped: list[dict] = []  # filled by the encoding pass (the one that counts)

    def pieces(self, record_skipped: bool = True) -> Iterator[Piece]:
        return iter_pieces(
            self.input_dir,
            self.files,
            text_field=self.opts.text_field,
            on_bad_input=self.opts.on_bad_input,
            skipped=self.skipped if record_skipped else [],
            block_chars=self.block_chars,
        )

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
    probability = min(1.0, budget / max(corpus.total_bytes, 1))
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


def _size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0
