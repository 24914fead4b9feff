"""Writing: both splits' token files, each document followed by the end-of-text id.

If val ends up shorter than one window of max_length+1 tokens, whole pieces from the end of
train are moved to val, except in a shard of a sharded prepare: moving pieces there would make
the shards differ from one prepare of the whole corpus (whose val is the union of theirs, so it
needs no top-up when each shard's val holds a window), so a shard that short is an error that
says to use fewer shards. The caller writes into a work folder (io.atomic.AtomicFolder) that is
renamed into place only when complete.
"""

from __future__ import annotations

import os
import time
from collections import deque
from pathlib import Path

import numpy as np

from llm_lightning.data.format import split_path, token_dtype
from llm_lightning.data.prepare.encode import encode_pieces
from llm_lightning.data.prepare.options import PrepareOptions
from llm_lightning.data.prepare.progress import progress_bar
from llm_lightning.data.prepare.read import Corpus
from llm_lightning.data.sources import Piece
from llm_lightning.data.tokenizers import Tokenizer
from llm_lightning.errors import UserError

WRITE_TOKENS = 1 << 20  # tokens buffered per split before a write


class SplitWriter:
    """Appends pieces to one split's token file, ending each document with the end-of-text id.

    A long document cut into blocks stays one document: no end-of-text between consecutive
    blocks that land in the same split, but one where the next block went to the other split.
    It also remembers where its most recent pieces start, enough of them to hand
    `keep_tokens` tokens to the val split if that ends up too short.
    """

    def __init__(self, path: Path, dtype: np.dtype, eos_id: int, keep_tokens: int):
        self.path, self.dtype, self.keep_tokens = path, dtype, keep_tokens
        self.eos = np.array([eos_id], dtype=dtype)
        self.file = open(path, "wb")  # noqa: SIM115 (closed in close)
        self.tokens = self.documents = 0
        self.text_bytes = 0  # UTF-8 bytes of the text written (bits per byte need them)
        self._buffer: list[np.ndarray] = []  # written in large chunks: one write per piece is slow
        self._buffered = 0
        self._open_piece: tuple[str, int, int] | None = None  # last piece, if its document goes on
        self._starts: deque[tuple[int, int]] = deque()  # (tokens, text_bytes) before each recent piece

    def add(self, piece: Piece, ids: np.ndarray) -> None:
        if self._open_piece is not None and self._open_piece != (piece.source, piece.doc, piece.part - 1):
            self._write(self.eos)
        self._remember_start()
        self.text_bytes += len(piece.text.encode("utf-8"))
        self._write(ids)
        self.documents += 1
        if piece.last:
            self._write(self.eos)
            self._open_piece = None
        else:
            self._open_piece = (piece.source, piece.doc, piece.part)

    def _remember_start(self) -> None:
        self._starts.append((self.tokens, self.text_bytes))
        # Forget starts that could never be needed: the pieces after them already hold enough.
        while len(self._starts) > 1 and self.tokens - self._starts[1][0] >= self.keep_tokens:
            self._starts.popleft()

    def _write(self, ids: np.ndarray) -> None:
        # A copy: `ids` is a view that would keep a whole batch's array alive until the next
        # write, and the val split writes rarely.
        self._buffer.append(ids.astype(self.dtype, copy=True))
        self._buffered += len(ids)
        self.tokens += len(ids)
        if self._buffered >= WRITE_TOKENS:
            self._flush()

    def _flush(self) -> None:
        if self._buffer:
            np.concatenate(self._buffer).tofile(self.file)
            self._buffer, self._buffered = [], 0
        self.file.flush()

    def finish(self) -> None:
        if self._open_piece is not None:
            self._write(self.eos)
            self._open_piece = None
        self._flush()

    def move_tail(self, other: SplitWriter, tokens: int) -> int:
        """Move the fewest whole trailing pieces holding >= `tokens` tokens; return how many."""
        enough = [i for i, (start, _) in enumerate(self._starts) if self.tokens - start >= tokens]
        if not enough or self._starts[enough[-1]][0] == 0:
            return 0  # not enough, or it would take everything: the caller reports too little text
        (cut, cut_bytes), moved = self._starts[enough[-1]], len(self._starts) - enough[-1]
        other.text_bytes += self.text_bytes - cut_bytes
        self.text_bytes = cut_bytes
        self._flush()
        other._write(np.fromfile(self.path, dtype=self.dtype, offset=cut * self.dtype.itemsize))
        self.file.truncate(cut * self.dtype.itemsize)
        self.file.seek(0, os.SEEK_END)
        self.tokens, self.documents, other.documents = cut, self.documents - moved, other.documents + moved
        last = np.fromfile(self.path, dtype=self.dtype, count=1, offset=(cut - 1) * self.dtype.itemsize)
        if last[0] != self.eos[0]:  # the moved piece continued a document that stays here
            self._write(self.eos)
        other._flush()
        self._flush()
        return moved

    def close(self) -> None:
        self._flush()
        os.fsync(self.file.fileno())
        self.file.close()


def encode_corpus(tok: Tokenizer, corpus: Corpus, work: Path, opts: PrepareOptions) -> dict:
    """Encode and write both splits; return the counts for metadata.json."""
    dtype = token_dtype(tok.vocab_size)
    window = opts.max_length + 1
    split_path(work, "train").parent.mkdir()
    train = SplitWriter(split_path(work, "train"), dtype, tok.eos_id, keep_tokens=window)
    val = SplitWriter(split_path(work, "val"), dtype, tok.eos_id, keep_tokens=window)
    bar = progress_bar(corpus.total_bytes, "encoding", opts.progress)
    started, files_seen, last_source = time.perf_counter(), 0, None
    try:
        for piece, ids in encode_pieces(tok, corpus.pieces(), opts.num_workers, dtype):
            (val if corpus.is_val(piece) else train).add(piece, ids)
            if piece.source != last_source:
                files_seen, last_source = files_seen + 1, piece.source
            bar.update(piece.nbytes)
            if not bar.disable:
                tokens = train.tokens + val.tokens
                rate = tokens / max(time.perf_counter() - started, 1e-9)
                bar.set_postfix_str(
                    f"files {files_seen}/{len(corpus.files)}, docs {train.documents + val.documents:,}, "
                    f"tokens {tokens:,}, {rate:,.0f} tok/s",
                    refresh=False,
                )
        train.finish()
        val.finish()
        top_up = val.tokens < window and corpus.shard is None
        moved = train.move_tail(val, window - val.tokens) if top_up else 0
        if (val.tokens < window or train.tokens < window) and corpus.shard is not None:
            shard = corpus.shard
            raise UserError(
                f"--shard_index {shard['index']}: too little text in this shard ({train.tokens:,} train and "
                f"{val.tokens:,} val tokens), but each split of every shard needs one window of --max_length+1 = "
                f"{window:,} tokens (shards never top val up from train); use fewer --num_shards than "
                f"{shard['count']}, or a larger --val_fraction"
            )
        if val.tokens < window or train.tokens < window:
            raise UserError(
                f"too little text: {train.tokens:,} train and {val.tokens:,} val tokens in "
                f"{train.documents + val.documents:,} documents or blocks, but each split needs one window of "
                f"--max_length+1 = {window:,} tokens; add text or lower --max_length"
            )
    finally:
        bar.close()
        train.close()
        val.close()
    return {
        "num_documents": {"train": train.documents, "val": val.documents},
        "num_tokens": {"train": train.tokens, "val": val.tokens},
        "num_bytes": {"train": train.text_bytes, "val": val.text_bytes},
        "val_documents_moved_from_train": moved,
    }
