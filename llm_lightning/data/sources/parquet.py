"""Parquet documents: one per row of the text column, a row group and a batch of rows at a time."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

from llm_lightning.data.sources.bad_input import _STREAM_FIX, _BadInput, _one_line
from llm_lightning.errors import UserError

_PARQUET_BATCH_ROWS = 256  # rows turned into Python strings at a time
_COLUMN_FIX = "name the text column with --text_field"


def _pyarrow(path: str):
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise UserError(
            f"{path}: reading .parquet files needs the pyarrow package; pip install pyarrow"
        ) from None
    return pyarrow, pyarrow.parquet


def _parquet_documents(path: str, text_field: str, bad: _BadInput) -> Iterator[tuple[Iterable[str], int]]:
    """One document per row of the text column, read one row group at a time."""
    pa, pq = _pyarrow(path)
    # A damaged file makes pyarrow raise all sorts (ArrowInvalid, plain OSError, UnicodeDecodeError
    # from a column name...), so whatever its calls raise counts as damage. Only its calls are
    # inside those `try`s: a UserError from `bad` and the consumer's code stay outside.
    with open(path, "rb") as file:  # opened here, so that a file we cannot open says so
        size = os.fstat(file.fileno()).st_size
        try:
            parquet = pq.ParquetFile(file)
            names, rows = parquet.schema_arrow.names, parquet.metadata.num_rows
            kind = parquet.schema_arrow.field(text_field).type if names.count(text_field) == 1 else None
        except Exception as error:
            bad(path, None, f"not a readable Parquet file ({_one_line(error)})", _STREAM_FIX)
            return
        if kind is None and text_field in names:
            twice = f"Parquet file has {names.count(text_field)} columns named {text_field!r}"
            bad(path, None, twice, _COLUMN_FIX)
            return
        if kind is None:
            have = ", ".join(repr(name) for name in names) or "none"
            missing = f"Parquet file has no {text_field!r} column (its columns: {have})"
            bad(path, None, missing, _COLUMN_FIX)
            return
        if pa.types.is_dictionary(kind):
            kind = kind.value_type
        binary = _is_type(pa, kind, "binary", "large_binary", "binary_view")
        if not binary and not _is_type(pa, kind, "string", "large_string", "string_view"):
            bad(path, None, f"column {text_field!r} holds {kind}, not strings", _COLUMN_FIX)
            return
        batches = _parquet_batches(parquet, text_field)
        row, counted = 0, 0  # row: index of the next row; counted: file bytes given out so far
        while True:
            try:
                batch = next(batches, None)
                values = [] if batch is None else _column_texts(batch.column(0), binary)
            except Exception as error:
                bad(path, None, f"row {row}: corrupt Parquet data ({_one_line(error)})", _STREAM_FIX)
                return
            if batch is None:
                return
            for value in values:
                row += 1
                if value is None or value is _NOT_UTF8:
                    what = "null" if value is None else "not UTF-8 text"
                    bad(path, None, f"row {row - 1}: {text_field!r} is {what}", "fix or drop the row")
                    continue
                # The file's bytes, shared evenly among its rows (progress only).
                share = size - counted if row == rows else size * row // max(rows, 1) - counted
                counted += share
                yield [value], share


def _parquet_batches(parquet, text_field: str) -> Iterator:
    """The text column in batches of rows, one row group after the other (never the whole file)."""
    for group in range(parquet.num_row_groups):
        yield from parquet.iter_batches(
            batch_size=_PARQUET_BATCH_ROWS, row_groups=[group], columns=[text_field], use_threads=False
        )


_NOT_UTF8 = object()  # a row whose bytes are not UTF-8


def _column_texts(column, binary: bool) -> list:
    """A batch's values as str, None for a null and _NOT_UTF8 for bytes that do not decode."""
    try:
        values = column.to_pylist()
    except UnicodeDecodeError:  # a string column with bad bytes (a damaged file): row by row
        values = []
        for i in range(len(column)):
            try:
                values.append(column[i].as_py())
            except UnicodeDecodeError:
                values.append(_NOT_UTF8)
    if binary:
        values = [value if value is None else _utf8_or_marker(value) for value in values]
    return values


def _utf8_or_marker(value: bytes) -> str | object:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return _NOT_UTF8


def _is_type(pa, kind, *names: str) -> bool:
    """Whether `kind` is one of the arrow types named (those this pyarrow knows)."""
    return any(getattr(pa.types, f"is_{name}", lambda _: False)(kind) for name in names)
