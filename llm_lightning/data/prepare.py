"""`llm-lightning prepare`: a folder of raw text -> a tokenizer and train/val token files.

The pipeline, each step streaming so that the corpus is never in memory:

1. Check every flag and the input and output folders before anything is written.
2. Train the tokenizer on a seeded sample of the train split, capped at
   `--tokenizer_train_chars` characters (or load one with `--tokenizer` /
   `--tiktoken_encoding`).
3. Encode with `--num_workers` processes. Batches of pieces go out and come back in order, so
   the output is the same for any worker count. Each document is followed by the end-of-text id.
4. Each piece (a document, or a block of a long one) goes to train or val by a seeded hash of
   its position, before any windowing, so no val text is ever in a train window. If val ends
   up shorter than one window of max_length+1 tokens, whole pieces from the end of train are
   moved to val.

Everything is written to a temporary sibling folder `OUT.tmp-HOST-PID-XXXX`, metadata.json
last, and the folder is renamed to OUT at the end: a killed run never leaves an OUT that
looks complete, and an old OUT (replaced only with --overwrite) stays intact until then.
Temporary folders of dead runs on the same host are removed by the next run.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np
from tqdm import tqdm

from llm_lightning.data.sources import (
    DEFAULT_EXTENSIONS,
    ON_BAD_INPUT,
    Piece,
    find_files,
    iter_pieces,
    normalize_extensions,
)
from llm_lightning.data.tokenizer import (
    KINDS,
    Tokenizer,
    check_kind,
    check_vocab_size,
    load_tiktoken_encoding,
    load_tokenizer,
    load_tokenizer_from_files,
    train_tokenizer,
)
from llm_lightning.errors import UserError

FORMAT_VERSION = 1
METADATA = "metadata.json"
TRAIN_BIN = "dataset/train.bin"
VAL_BIN = "dataset/val.bin"

DEFAULT_TOKENIZER_TYPE = "bpe"
DEFAULT_VOCAB_SIZE = 32000
DEFAULT_VAL_FRACTION = 0.01
DEFAULT_SEED = 1337
DEFAULT_TOKENIZER_TRAIN_CHARS = 500_000_000
MAX_VAL_FRACTION = 0.5

BATCH_CHARS = 1 << 19  # characters of text per batch sent to a worker
INFLIGHT_PER_WORKER = 3  # batches queued per worker: keeps workers busy, bounds memory
WRITE_TOKENS = 1 << 20  # tokens buffered per split before a write


def default_block_chars(max_length: int) -> int:
    """Long documents are cut into blocks of about four windows of text (~4 chars per token)."""
    return 16 * (max_length + 1)


@dataclass(frozen=True)
class PrepareOptions:
    """The options of `prepare`, one per command-line flag (see `build_parser` for their help)."""

    tokenizer_type: str | None = None  # None: bpe, or the kind of `tokenizer`
    vocab_size: int | None = None  # None: DEFAULT_VOCAB_SIZE when a tokenizer is trained
    max_length: int = 2048
    stride: int = 1024
    num_workers: int = 4
    val_fraction: float = DEFAULT_VAL_FRACTION
    seed: int = DEFAULT_SEED
    extensions: tuple[str, ...] = DEFAULT_EXTENSIONS
    json_text_field: str = "text"
    tokenizer: str | os.PathLike | None = None  # folder of a saved tokenizer to reuse
    tiktoken_encoding: str | None = None
    on_bad_input: str = "error"
    overwrite: bool = False
    tokenizer_train_chars: int = DEFAULT_TOKENIZER_TRAIN_CHARS
    block_chars: int | None = None  # None: default_block_chars(max_length); no flag
    progress: bool | None = None  # None: progress bars only when stderr is a terminal; no flag


def prepare(input_dir: str | os.PathLike, output_dir: str | os.PathLike, **options) -> Path:
    """Prepare `input_dir` into `output_dir` (see the module docstring); returns `output_dir`.

    `options` are the fields of `PrepareOptions`, named like the command's flags:
    `prepare("raw", "out", vocab_size=8000, num_workers=2)`.
    """
    started = time.perf_counter()
    opts = PrepareOptions(**options)
    kind = _check_options(opts)
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    files = find_files(input_dir, normalize_extensions(opts.extensions))
    _check_output(input_dir, output_dir, opts.overwrite)
    corpus = _Corpus(input_dir, files, opts)

    work, created = _make_work_dir(output_dir)
    try:
        tok, tokenizer_info = _get_tokenizer(kind, corpus, opts)
        tok.save(work)
        counts = _encode_corpus(tok, corpus, work, opts)
        metadata = {
            "format_version": FORMAT_VERSION,
            "tokenizer_type": tok.kind,
            "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id,
            "dtype": token_dtype(tok.vocab_size).name,
            "max_length": opts.max_length,
            "stride": opts.stride,
            "val_fraction": opts.val_fraction,
            "seed": opts.seed,
            **counts,
            "files": {"train": TRAIN_BIN, "val": VAL_BIN},
            "tokenizer": tokenizer_info,
            "tokenizer_train_chars": opts.tokenizer_train_chars,
            "block_chars": corpus.block_chars,
            "extensions": list(normalize_extensions(opts.extensions)),
            "json_text_field": opts.json_text_field,
            "input_dir": str(input_dir.resolve()),
            "num_files": len(files),
            "sources": files,
            "skipped": corpus.skipped,
        }
        _write_json_atomic(work / METADATA, metadata)  # last: its presence means "complete"
        _move_into_place(work, output_dir)
    except BaseException:
        _remove_work_dir(work, created)
        raise
    _report(output_dir, metadata, opts.vocab_size, time.perf_counter() - started)
    return output_dir


# ---------------------------------------------------------------------------------------------
# Checks (all before anything is written)


def _check_options(opts: PrepareOptions) -> str:
    """Check the flags; return the tokenizer kind ("" when a loaded tokenizer decides)."""
    if opts.max_length < 1:
        raise UserError(f"--max_length must be at least 1, not {opts.max_length}")
    if not 1 <= opts.stride <= opts.max_length:
        raise UserError(f"--stride must be between 1 and --max_length ({opts.max_length}), not {opts.stride}")
    if opts.num_workers < 0:
        raise UserError(f"--num_workers must be 0 (encode in this process) or more, not {opts.num_workers}")
    if not 0 < opts.val_fraction <= MAX_VAL_FRACTION:
        raise UserError(
            f"--val_fraction must be above 0 and at most {MAX_VAL_FRACTION}, not {opts.val_fraction}"
        )
    if not opts.json_text_field:
        raise UserError("--json_text_field must not be empty; the default is 'text'")
    if opts.on_bad_input not in ON_BAD_INPUT:
        raise UserError(f"--on_bad_input must be one of {', '.join(ON_BAD_INPUT)}, not {opts.on_bad_input!r}")
    if opts.tokenizer_train_chars < 1:
        raise UserError(f"--tokenizer_train_chars must be at least 1, not {opts.tokenizer_train_chars}")
    if opts.block_chars is not None and opts.block_chars < 1:
        raise UserError(f"block_chars must be at least 1, not {opts.block_chars}")
    kind = opts.tokenizer_type
    if kind is not None:
        check_kind(kind)
    if opts.tokenizer is not None and opts.tiktoken_encoding is not None:
        raise UserError("--tokenizer and --tiktoken_encoding both name a tokenizer; pass only one")
    if opts.tiktoken_encoding is not None:
        if kind not in (None, "tiktoken"):
            raise UserError(f"--tiktoken_encoding needs --tokenizer_type tiktoken, not {kind}")
        return "tiktoken"
    if opts.tokenizer is not None:
        return kind or ""  # checked against the loaded tokenizer later
    kind = kind or DEFAULT_TOKENIZER_TYPE
    check_vocab_size(kind, opts.vocab_size or DEFAULT_VOCAB_SIZE)
    return kind


def _check_output(input_dir: Path, output_dir: Path, overwrite: bool) -> None:
    source, target = input_dir.resolve(), output_dir.resolve()
    if target == source or source in target.parents:
        raise UserError(
            f"--output_dir {output_dir} is inside --input_dir {input_dir}; "
            "its files would be read as input next time; choose a folder outside it"
        )
    if not target.exists():
        return
    if not target.is_dir():
        raise UserError(f"--output_dir {output_dir} is a file; choose a folder")
    if not any(target.iterdir()):
        return  # an empty folder is simply filled
    if not overwrite:
        raise UserError(f"--output_dir {output_dir} already exists; pass --overwrite to replace it")
    if not (target / METADATA).is_file():
        raise UserError(
            f"--output_dir {output_dir} is not empty and is not a prepare output (no {METADATA}); "
            "--overwrite only replaces a prepare output; choose another folder"
        )
    if target in source.parents:
        raise UserError(
            f"--input_dir {input_dir} is inside --output_dir {output_dir}, which --overwrite would delete; "
            "move the input or choose another output folder"
        )


# ---------------------------------------------------------------------------------------------
# The corpus: reading, split and sampling


class _Corpus:
    """The input files as pieces, with the seeded per-piece decisions made on them."""

    def __init__(self, input_dir: Path, files: list[str], opts: PrepareOptions):
        self.input_dir, self.files, self.opts = input_dir, files, opts
        self.block_chars = opts.block_chars or default_block_chars(opts.max_length)
        try:
            self.total_bytes = sum(os.stat(input_dir / name).st_size for name in files)
        except OSError as error:
            raise UserError(f"{error.filename}: cannot be read ({error.strerror}); check the file") from None
        self.skipped: list[dict] = []  # filled by the encoding pass (the one that counts)

    def pieces(self, record_skipped: bool = True) -> Iterator[Piece]:
        return iter_pieces(
            self.input_dir,
            self.files,
            text_field=self.opts.json_text_field,
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


# ---------------------------------------------------------------------------------------------
# Tokenizer


def _get_tokenizer(kind: str, corpus: _Corpus, opts: PrepareOptions) -> tuple[Tokenizer, dict]:
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
    bar = _bar(corpus.total_bytes, "reading for the tokenizer", opts.progress)

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


# ---------------------------------------------------------------------------------------------
# Encoding and writing


class _SplitWriter:
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
        self._buffer: list[np.ndarray] = []  # written in large chunks: one write per piece is slow
        self._buffered = 0
        self._open_piece: tuple[str, int, int] | None = None  # last piece, if its document goes on
        self._starts: deque[int] = deque()

    def add(self, piece: Piece, ids: np.ndarray) -> None:
        if self._open_piece is not None and self._open_piece != (piece.source, piece.doc, piece.part - 1):
            self._write(self.eos)
        self._remember_start()
        self._write(ids)
        self.documents += 1
        if piece.last:
            self._write(self.eos)
            self._open_piece = None
        else:
            self._open_piece = (piece.source, piece.doc, piece.part)

    def _remember_start(self) -> None:
        self._starts.append(self.tokens)
        # Forget starts that could never be needed: the pieces after them already hold enough.
        while len(self._starts) > 1 and self.tokens - self._starts[1] >= self.keep_tokens:
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

    def move_tail(self, other: _SplitWriter, tokens: int) -> int:
        """Move the fewest whole trailing pieces holding >= `tokens` tokens; return how many."""
        enough = [i for i, start in enumerate(self._starts) if self.tokens - start >= tokens]
        if not enough or self._starts[enough[-1]] == 0:
            return 0  # not enough, or it would take everything: the caller reports too little text
        cut, moved = self._starts[enough[-1]], len(self._starts) - enough[-1]
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


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def _encode_corpus(tok: Tokenizer, corpus: _Corpus, work: Path, opts: PrepareOptions) -> dict:
    """Encode and write both splits; return the counts for metadata.json."""
    dtype = token_dtype(tok.vocab_size)
    window = opts.max_length + 1
    (work / "dataset").mkdir()
    train = _SplitWriter(work / TRAIN_BIN, dtype, tok.eos_id, keep_tokens=window)
    val = _SplitWriter(work / VAL_BIN, dtype, tok.eos_id, keep_tokens=window)
    bar = _bar(corpus.total_bytes, "encoding", opts.progress)
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
        moved = train.move_tail(val, window - val.tokens) if val.tokens < window else 0
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
        "val_documents_moved_from_train": moved,
    }


def encode_pieces(
    tok: Tokenizer, pieces: Iterable[Piece], num_workers: int, dtype: np.dtype = np.dtype(np.uint32)
) -> Iterator[tuple[Piece, np.ndarray]]:
    """(piece, token ids) for every piece, in input order, using `num_workers` processes.

    0 workers encodes in this process. Worker processes are started with "spawn" (a fork after
    `tokenizers` has used its thread pool can deadlock), each is single-threaded, at most
    `INFLIGHT_PER_WORKER` batches per worker are queued, and a worker that dies or fails
    raises a UserError here instead of hanging.
    """
    batches = _batches(pieces, BATCH_CHARS)
    if num_workers == 0:
        for batch in batches:
            yield from _unpack(batch, _encode_texts(tok, [p.text for p in batch], dtype))
        return
    pool = ProcessPoolExecutor(
        num_workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker,
        initargs=(tok.files(), dtype.str),
    )
    pending: deque[tuple[list[Piece], Future]] = deque()
    try:
        for batch in batches:
            pending.append((batch, pool.submit(_worker_encode, [p.text for p in batch])))
            if len(pending) >= INFLIGHT_PER_WORKER * num_workers:
                yield from _unpack(*_result(pending.popleft()))
        while pending:
            yield from _unpack(*_result(pending.popleft()))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _batches(pieces: Iterable[Piece], max_chars: int) -> Iterator[list[Piece]]:
    batch, chars = [], 0
    for piece in pieces:
        batch.append(piece)
        chars += len(piece.text)
        if chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _result(item: tuple[list[Piece], Future]) -> tuple[list[Piece], tuple[np.ndarray, np.ndarray]]:
    batch, future = item
    try:
        return batch, future.result()
    except BrokenProcessPool:
        raise UserError(
            "an encoding worker process died (killed, or out of memory?); try a smaller --num_workers"
        ) from None
    except UserError:
        raise
    except Exception as error:
        raise UserError(
            f"encoding failed in a worker process near {batch[0].source} ({type(error).__name__}: {error}); "
            "try --num_workers 0 to see it in this process"
        ) from error


def _unpack(batch: list[Piece], result: tuple[np.ndarray, np.ndarray]) -> Iterator[tuple[Piece, np.ndarray]]:
    ids, lengths = result
    ends = np.cumsum(lengths)
    for piece, start, end in zip(batch, ends - lengths, ends, strict=True):
        yield piece, ids[start:end]


def _encode_texts(tok: Tokenizer, texts: list[str], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Encode a batch into one flat array plus lengths: cheap to send between processes."""
    encoded = tok.encode_batch(texts)
    lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
    ids = np.fromiter(chain.from_iterable(encoded), dtype=dtype, count=int(lengths.sum()))
    return ids, lengths


_worker_tokenizer: Tokenizer | None = None
_worker_dtype: np.dtype | None = None


def _init_worker(files: dict[str, str], dtype: str) -> None:
    global _worker_tokenizer, _worker_dtype
    # One thread per worker: the processes are the parallelism.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"
    # Ctrl-C goes to the whole process group; the parent handles it and stops the pool.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker_tokenizer = load_tokenizer_from_files(files)
    _worker_dtype = np.dtype(dtype)


def _worker_encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return _encode_texts(_worker_tokenizer, texts, _worker_dtype)


# ---------------------------------------------------------------------------------------------
# Files and folders


def _make_work_dir(output_dir: Path) -> tuple[Path, list[Path]]:
    """A fresh work folder beside OUT; also the parent folders created for it (to undo)."""
    created = [p for p in reversed(output_dir.absolute().parents) if not p.exists()]
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_work_dirs(output_dir)
    prefix = f"{output_dir.name}.tmp-{socket.gethostname()}-{os.getpid()}-"
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=output_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(work, 0o777 & ~umask)  # mkdtemp makes it private; OUT should get the usual permissions
    return work, created


def _remove_work_dir(work: Path, created: list[Path]) -> None:
    shutil.rmtree(work, ignore_errors=True)
    for folder in reversed(created):  # deepest first; only the ones still empty
        try:
            folder.rmdir()
        except OSError:
            break


def _remove_dead_work_dirs(output_dir: Path) -> None:
    """Remove `OUT.tmp-HOST-PID-*` folders left by killed runs on this host."""
    host = socket.gethostname()
    prefix = f"{output_dir.name}.tmp-"
    for path in output_dir.parent.glob(glob.escape(prefix) + "*"):
        parts = path.name[len(prefix) :].rsplit("-", 2)
        if len(parts) == 3 and parts[0] == host and parts[1].isdigit() and not _alive(int(parts[1])):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _move_into_place(work: Path, output_dir: Path) -> None:
    """Rename the finished work folder to OUT, replacing an old OUT only now."""
    old = None
    if output_dir.exists():
        if any(output_dir.iterdir()):
            # Named like a work folder of this process, so it is cleaned up if we die right here.
            old = output_dir.with_name(f"{output_dir.name}.tmp-{socket.gethostname()}-{os.getpid()}-old")
            os.rename(output_dir, old)
        else:
            output_dir.rmdir()
    try:
        os.rename(work, output_dir)
    except OSError:
        if old is not None:
            os.rename(old, output_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Reporting


def _bar(total: int, desc: str, progress: bool | None) -> tqdm:
    # disable=None: tqdm shows the bar only when stderr is a terminal (not in logs or pipes).
    return tqdm(
        total=total,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        disable=None if progress is None else not progress,
        file=sys.stderr,
        leave=False,
    )


def _report(output_dir: Path, metadata: dict, vocab_size: int | None, seconds: float) -> None:
    tokens, docs = metadata["num_tokens"], metadata["num_documents"]
    total = tokens["train"] + tokens["val"]
    print(
        f"prepared {output_dir}: {metadata['num_files']} files, {docs['train']:,} train + {docs['val']:,} val "
        f"documents, {tokens['train']:,} train + {tokens['val']:,} val tokens, {metadata['tokenizer_type']} "
        f"vocabulary {metadata['vocab_size']:,}, {seconds:.1f} s ({total / max(seconds, 1e-9):,.0f} tokens/s)"
    )
    if vocab_size is not None and vocab_size != metadata["vocab_size"]:
        why = "the corpus is too small for more" if metadata["tokenizer"]["source"] == "trained" else "given"
        print(
            f"note: the vocabulary has {metadata['vocab_size']:,} tokens ({why}), not --vocab_size {vocab_size:,}"
        )
    skipped = metadata["skipped"]
    if skipped:
        first = skipped[0]
        where = first["file"] if first["line"] is None else f"{first['file']}:{first['line']}"
        print(
            f"warning: skipped {len(skipped)} bad files or lines (listed under 'skipped' in "
            f"{output_dir / METADATA}), first: {where}: {first['reason']}",
            file=sys.stderr,
        )


# ---------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llm-lightning prepare",
        description="Turn a folder of raw text (.txt .md .json .jsonl, recursive) into a trained tokenizer "
        "and train/val token files (OUT/tokenizer.json, OUT/dataset/{train,val}.bin, OUT/metadata.json).",
    )
    add = parser.add_argument
    # fmt: off
    add("--input_dir", metavar="DIR", required=True, help="folder of text files, read recursively (required)")
    add("--output_dir", metavar="DIR", required=True, help="folder to write, outside --input_dir (required)")
    add("--tokenizer_type", choices=KINDS, metavar="KIND",
        help="bpe: byte-level BPE (GPT-2 style); wordpiece: BERT-style WordPiece; tiktoken: byte-level BPE "
        "with the GPT-4 split pattern, served by tiktoken (default: bpe, or the kind of --tokenizer)")
    add("--vocab_size", type=int, metavar="N",
        help=f"vocabulary size to train (default: {DEFAULT_VOCAB_SIZE}); a tiny corpus may give fewer")
    add("--max_length", type=int, default=2048, metavar="N",
        help="tokens per training sequence; a window is max_length+1 tokens (default: 2048)")
    add("--stride", type=int, default=1024, metavar="N",
        help="tokens between the starts of consecutive windows, 1..max_length; recorded for training "
        "(default: 1024)")
    add("--num_workers", type=int, default=4, metavar="N",
        help="encoding processes; 0 encodes in this process; the output is the same for any value (default: 4)")
    add("--val_fraction", type=float, default=DEFAULT_VAL_FRACTION, metavar="F",
        help="share of documents (or blocks of long ones) held out for validation by a seeded hash, "
        f"topped up to at least one window (default: {DEFAULT_VAL_FRACTION})")
    add("--seed", type=int, default=DEFAULT_SEED, metavar="N",
        help=f"seed of the train/val split and of the tokenizer's sample (default: {DEFAULT_SEED})")
    add("--extensions", nargs="+", default=list(DEFAULT_EXTENSIONS), metavar="EXT",
        help=f"file extensions to read (default: {' '.join(DEFAULT_EXTENSIONS)})")
    add("--json_text_field", default="text", metavar="FIELD",
        help="field holding the text in .json/.jsonl objects (default: text)")
    add("--tokenizer", metavar="DIR",
        help="reuse the tokenizer of an earlier prepare output (or a saved tokenizer folder) instead of training")
    add("--tiktoken_encoding", metavar="NAME",
        help="use a named tiktoken encoding such as cl100k_base, only if its file is already in the local "
        "tiktoken cache (TIKTOKEN_CACHE_DIR); nothing is downloaded")
    add("--on_bad_input", choices=ON_BAD_INPUT, default="error",
        help="error: stop at the first malformed, non-UTF-8 or text-less file or line; skip: leave it out, "
        "list it in metadata.json and report it at the end (default: error)")
    add("--overwrite", action="store_true", help="replace --output_dir if it holds an earlier prepare output")
    add("--tokenizer_train_chars", type=int, default=DEFAULT_TOKENIZER_TRAIN_CHARS, metavar="N",
        help="train the tokenizer on at most this many characters, sampled evenly over the train split "
        f"(default: {DEFAULT_TOKENIZER_TRAIN_CHARS:,})")
    # fmt: on
    return parser


def main(argv: list[str] | None = None) -> int:
    options = vars(build_parser().parse_args(argv))
    options["extensions"] = tuple(options["extensions"])
    prepare(options.pop("input_dir"), options.pop("output_dir"), **options)
    return 0


if __name__ == "__main__":
    sys.exit(main())
