"""Plain text, JSON and JSONL documents, compressed or not, and the checks that they are UTF-8.

A text document (`.txt`, `.md` or any other extension read as text) is one file, checked whole
before any of it is given out and then streamed a chunk at a time; JSONL streams a line at a
time; a `.json` file is parsed whole.
"""

from __future__ import annotations

import codecs
import io
import json
import os
from collections.abc import Iterable, Iterator

from llm_lightning.data.sources.bad_input import _STREAM_FIX, _BadInput, _one_line
from llm_lightning.data.sources.streams import _STREAM_ERRORS, _open_binary, _stream_problem
from llm_lightning.errors import UserError

_READ_CHUNK = 1 << 20  # bytes/chars read from a file at a time
_CHECK_CHUNK = 1 << 14  # decompressed bytes read at a time when checking (finer line numbers)
_KEEP_DECOMPRESSED = 4 << 20  # a compressed text file up to this size (decompressed) is read once
_FIELD_FIX = "name the text field with --text_field"


def _text_documents(
    path: str, bad: _BadInput, compression: str | None
) -> Iterator[tuple[Iterable[str], int]]:
    # Check the encoding (and a compressed stream) first: a file that turns out bad half way
    # must not have had its first half emitted already when it is skipped.
    if compression is not None:
        ok, kept = _check_compressed_text(path, compression, bad)
        if ok:
            chunks = kept if kept is not None else _stream_compressed_text(path, compression)
            yield chunks, os.stat(path).st_size
        return
    bad_line = _first_non_utf8_line(path)
    if bad_line is not None:
        bad(path, bad_line, "not UTF-8 text", "convert it to UTF-8 (e.g. with iconv)")
        return
    yield _stream_text(path), os.stat(path).st_size


def _stream_text(path: str) -> Iterator[str]:
    # newline="" keeps "\r\n" as it is, so decoding the tokens gives back the file's text;
    # utf-8-sig drops a byte order mark.
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            while chunk := f.read(_READ_CHUNK):
                yield chunk
    except OSError as error:  # e.g. the file vanished after it was listed
        raise UserError(f"{path}: cannot be read ({error.strerror or error}); check the file") from None


class _Utf8Check:
    """Feeds bytes through a UTF-8 decoder, counting lines, to find the first bad byte."""

    def __init__(self):
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self.line = 1  # the line reached so far (1-based)
        self.text = ""  # the text decoded from the last chunk

    def feed(self, chunk: bytes) -> int | None:
        """The line of a bad byte in `chunk` (an empty chunk ends the input), else None."""
        held = len(self._decoder.getstate()[0])  # bytes of a character split across chunks
        try:
            self.text = self._decoder.decode(chunk, final=not chunk)
        except UnicodeDecodeError as error:
            return self.line + chunk.count(b"\n", 0, max(error.start - held, 0))
        self.line += chunk.count(b"\n")
        return None


def _first_non_utf8_line(path: str) -> int | None:
    """The 1-based line of the first byte that is not valid UTF-8, or None if all is valid."""
    check = _Utf8Check()
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_READ_CHUNK)
            bad_line = check.feed(chunk)
            if bad_line is not None or not chunk:
                return bad_line


def _check_compressed_text(path: str, compression: str, bad: _BadInput) -> tuple[bool, list[str] | None]:
    """Decompress the whole file once to check it: (good, its text chunks if small enough to keep).

    A small file is then not decompressed twice; a large one streams again after the check.
    """
    check, kept, kept_bytes = _Utf8Check(), [], 0  # kept: the text so far, while it is small
    try:
        with _open_binary(path, compression) as (stream, _):
            while True:
                chunk = stream.read1(_CHECK_CHUNK)
                bad_line = check.feed(chunk)
                if bad_line is not None:
                    bad(path, bad_line, "not UTF-8 text", "convert it to UTF-8 (e.g. with iconv)")
                    return False, None
                if not chunk:
                    break
                if kept is not None:
                    kept.append(check.text)
                    kept_bytes += len(chunk)
                    if kept_bytes > _KEEP_DECOMPRESSED:
                        kept = None
    except _STREAM_ERRORS as error:
        bad(path, check.line, _stream_problem(compression, error), _STREAM_FIX)
        return False, None
    # Drop a byte order mark, as utf-8-sig does (the check decodes as plain utf-8).
    first = next((i for i, text in enumerate(kept or []) if text), None)
    if first is not None and kept[first].startswith("\ufeff"):
        kept[first] = kept[first][1:]
    return True, kept


def _stream_compressed_text(path: str, compression: str) -> Iterator[str]:
    """The text of a compressed file already checked by _check_compressed_text."""
    try:
        with _open_binary(path, compression) as (stream, _):
            text = io.TextIOWrapper(stream, encoding="utf-8-sig", newline="")
            while chunk := text.read(_READ_CHUNK):
                yield chunk
    except (OSError, UnicodeDecodeError, *_STREAM_ERRORS) as error:  # it changed since the check
        raise UserError(f"{path}: cannot be read ({_one_line(error)}); check the file") from None


# ---------------------------------------------------------------------------------------------
# JSON and JSONL


def _json_documents(
    path: str, text_field: str, bad: _BadInput, compression: str | None
) -> Iterator[tuple[Iterable[str], int]]:
    with _open_binary(path, compression) as (stream, _):
        if compression is None:
            raw = stream.read()
        else:
            chunks: list[bytes] = []
            try:
                while chunk := stream.read1(_CHECK_CHUNK):
                    chunks.append(chunk)
            except _STREAM_ERRORS as error:
                line = sum(chunk.count(b"\n") for chunk in chunks) + 1
                bad(path, line, _stream_problem(compression, error), _STREAM_FIX)
                return
            raw = b"".join(chunks)
    try:
        data = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        bad(path, line, "not UTF-8 text", "convert it to UTF-8 (e.g. with iconv)")
        return
    except json.JSONDecodeError as error:
        bad(path, error.lineno, f"malformed JSON ({error.msg} at column {error.colno})", "fix the JSON")
        return
    items = data if isinstance(data, list) else [data]
    texts = []
    for index, item in enumerate(items):
        where = f"item {index}: " if isinstance(data, list) else ""
        text, problem = _text_of(item, text_field)
        if text is None:
            bad(path, None, where + problem, _FIELD_FIX)
        else:
            texts.append(text)
    # The file's bytes count once, with its last document (progress only).
    size = len(raw) if compression is None else os.stat(path).st_size
    for i, text in enumerate(texts):
        yield [text], size if i == len(texts) - 1 else 0


def _jsonl_documents(
    path: str, text_field: str, bad: _BadInput, compression: str | None
) -> Iterator[tuple[Iterable[str], int]]:
    with _open_binary(path, compression) as (stream, counter):
        line_number, counted = 0, 0  # counted: compressed bytes given to documents so far
        try:
            for line_number, raw in enumerate(stream, start=1):
                try:
                    line = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
                except UnicodeDecodeError:
                    bad(path, line_number, "not UTF-8 text", "convert it to UTF-8 (e.g. with iconv)")
                    continue
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as error:
                    bad(
                        path,
                        line_number,
                        f"malformed JSON ({error.msg} at column {error.colno})",
                        "fix the line",
                    )
                    continue
                text, problem = _text_of(item, text_field)
                if text is None:
                    bad(path, line_number, problem, _FIELD_FIX)
                elif counter is None:
                    yield [text], len(raw)
                else:  # the compressed bytes read since the last document (read ahead in chunks)
                    yield [text], counter.count - counted
                    counted = counter.count
        except _STREAM_ERRORS as error:
            if compression is None:
                raise
            bad(path, line_number + 1, _stream_problem(compression, error), _STREAM_FIX)


def _text_of(item: object, text_field: str) -> tuple[str | None, str]:
    """(text, "") for a JSON item that holds text, else (None, why not)."""
    if isinstance(item, str):
        return item, ""
    if not isinstance(item, dict):
        return None, f"expected an object with a {text_field!r} field or a string, got {type(item).__name__}"
    if text_field not in item:
        return None, f"JSON object has no {text_field!r} field"
    value = item[text_field]
    if not isinstance(value, str):
        return None, f"field {text_field!r} is {type(value).__name__}, not a string"
    return value, ""
