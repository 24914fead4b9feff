"""Encoding: pieces -> token ids with worker processes, in input order.

Batches of pieces go out and come back in order, so the output is the same for any worker
count. Workers are started with "spawn" (a fork after `tokenizers` has used its thread pool
can deadlock), each single-threaded, with a bounded number of batches queued per worker; a
worker that dies or fails raises a UserError here instead of hanging.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from itertools import chain

import numpy as np

from llm_lightning.data.sources import Piece
from llm_lightning.data.tokenizers import Tokenizer, load_tokenizer_from_files
from llm_lightning.errors import UserError

BATCH_CHARS = 1 << 19  # characters of text per batch sent to a worker
INFLIGHT_PER_WORKER = 3  # batches queued per worker: keeps workers busy, bounds memory


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
