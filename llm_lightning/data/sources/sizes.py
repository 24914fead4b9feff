"""How much text a file holds, without reading it (prepare's tokenizer sampling rate only)."""

from __future__ import annotations

import os
from typing import BinaryIO

from llm_lightning.data.sources.files import _format_of
from llm_lightning.data.sources.parquet import _pyarrow
from llm_lightning.data.sources.streams import _zstandard

COMPRESSION_RATIO = 4  # text bytes per compressed byte when a file does not say (gzip/zstd on prose: 3-5x)
_MAX_RATIO = 64  # a size read from a trailer or header that claims more is taken as wrong


def estimated_text_bytes(path: str | os.PathLike, text_field: str = "text") -> int:
    """About how many bytes of text a file holds, from its size and at most its header or footer.

    Plain files: their size. gzip: the ISIZE trailer (the uncompressed size modulo 2**32 of the
    last member), unwrapped to the plausible size nearest COMPRESSION_RATIO x the file's. zstd:
    the first frame's content size where its header records one that can cover the whole file.
    Parquet: the uncompressed size of the text column in every row group (the footer). Where
    none of that is known or plausible: COMPRESSION_RATIO x the size on disk. For prepare's
    tokenizer sampling rate only; what a file really holds is found when it is read.
    """
    path = os.fspath(path)
    suffix, compression = _format_of(path)
    try:
        size = os.stat(path).st_size
        if suffix == ".parquet" and not compression:
            return _parquet_text_bytes(path, text_field, size)
        if compression is None:
            return size
        with open(path, "rb") as file:
            told = _gzip_size(file, size) if compression == ".gz" else _zstd_size(file, path)
    except Exception:  # unreadable or damaged: reading it later says so
        return _size_or_zero(path) * (COMPRESSION_RATIO if compression else 1)
    plausible = told is not None and size <= told <= _MAX_RATIO * max(size, 1)
    return told if plausible else COMPRESSION_RATIO * size


def _size_or_zero(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def _gzip_size(file: BinaryIO, size: int) -> int | None:
    if size < 18:  # header (10) + trailer (8)
        return None
    file.seek(size - 4)
    remainder = int.from_bytes(file.read(4), "little")
    # The true size is remainder + k * 2**32 for some k >= 0: take the k nearest the usual ratio.
    k = max(0, round((COMPRESSION_RATIO * size - remainder) / 2**32))
    return remainder + k * 2**32


def _zstd_size(file: BinaryIO, path: str) -> int | None:
    told = _zstandard(path).frame_content_size(file.read(18))  # a frame header is at most 18 bytes
    return told if told >= 0 else None  # -1: not recorded


def _parquet_text_bytes(path: str, text_field: str, size: int) -> int:
    metadata = _pyarrow(path)[1].ParquetFile(path).metadata
    total, found = 0, False
    for group in range(metadata.num_row_groups):
        row_group = metadata.row_group(group)
        for column in range(row_group.num_columns):
            chunk = row_group.column(column)
            if chunk.path_in_schema == text_field:
                total, found = total + chunk.total_uncompressed_size, True
    return total if found else size
