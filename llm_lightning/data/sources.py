"""Reading a folder of raw text as one stream of document pieces.

- Files are found recursively and read in sorted order of their path relative to the input
  folder, so the stream (and everything derived from it) is the same on every run and machine.
  Hidden files and folders (names starting with ".") are left out.
- Formats: `.txt` and `.md` are one document per file; `.json` holds an object with the text
  field, a list of such objects, or a list of strings; `.jsonl` holds one object (or string)
  per line. Any other extension asked for with `--extensions` is read as plain text.
- Documents longer than `block_chars` are cut into contiguous blocks at a line break (else a
  space) so that a corpus of one or a few huge files can still be split into train and val,
  and so that a huge text file is read a block at a time instead of whole.
- Memory: text files stream a block at a time, JSONL a line at a time; a `.json` file is
  parsed whole (JSON has no cheap streaming parser), one file at a time.
- Bad input (malformed JSON, a missing text field, bytes that are not UTF-8) raises a
  `UserError` naming the file and line, or with `on_bad_input="skip"` is skipped and recorded.
"""

from __future__ import annotations

import codecs
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from llm_lightning.errors import UserError

DEFAULT_EXTENSIONS = (".txt", ".md", ".json", ".jsonl")
ON_BAD_INPUT = ("error", "skip")
DEFAULT_BLOCK_CHARS = 32768

_READ_CHUNK = 1 << 20  # bytes/chars read from a file at a time


@dataclass(frozen=True)
class Piece:
    """A document, or one block of a long document: the unit of the train/val split."""

    text: str
    source: str  # file path relative to the input folder, "/"-separated
    doc: int  # index of the document within its file
    part: int  # index of this block within its document (0 when the document is whole)
    last: bool  # True when this piece ends its document
    nbytes: int = 0  # input bytes this piece accounts for (for progress only)


def normalize_extensions(extensions: Iterable[str]) -> tuple[str, ...]:
    """`txt`, `.TXT` and `.txt` all mean `.txt`."""
    result = []
    for ext in extensions:
        ext = ext.strip().lower()
        if not ext.strip("."):
            raise UserError(f"--extensions: {ext!r} is not a file extension; use e.g. .txt .md .json .jsonl")
        result.append(ext if ext.startswith(".") else "." + ext)
    return tuple(dict.fromkeys(result))


def find_files(input_dir: str | os.PathLike, extensions: Iterable[str] = DEFAULT_EXTENSIONS) -> list[str]:
    """Paths (relative to `input_dir`, "/"-separated, sorted) of all files with one of `extensions`.

    Kept as short strings: a corpus can have millions of files.
    """
    root = Path(input_dir)
    if not root.exists():
        raise UserError(f"--input_dir {root} does not exist; point it at a folder of text files")
    if not root.is_dir():
        raise UserError(f"--input_dir {root} is not a folder; point it at a folder of text files")
    extensions = normalize_extensions(extensions)
    found, seen_any = [], False
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]
        prefix = Path(folder).relative_to(root).as_posix()
        for name in names:
            if name.startswith("."):
                continue
            seen_any = True
            if name.lower().endswith(extensions):
                found.append(name if prefix == "." else f"{prefix}/{name}")
    if not seen_any:
        raise UserError(f"--input_dir {root} is empty; add .txt, .md, .json or .jsonl files")
    if not found:
        raise UserError(
            f"--input_dir {root} has no {' '.join(extensions)} files; add some or change --extensions"
        )
    return sorted(found)


def iter_pieces(
    input_dir: str | os.PathLike,
    files: Iterable[str | os.PathLike],
    *,
    text_field: str = "text",
    on_bad_input: str = "error",
    skipped: list[dict] | None = None,
    block_chars: int = DEFAULT_BLOCK_CHARS,
) -> Iterator[Piece]:
    """Every piece of every file (paths relative to `input_dir`, as `find_files` gives them), in order.

    Bad input raises a UserError, or with `on_bad_input="skip"` is appended to `skipped`.
    """
    root = os.fspath(input_dir)
    bad = _BadInput(on_bad_input, [] if skipped is None else skipped)
    for name in files:
        name = os.fspath(name)  # plain strings: pathlib costs more than reading a small file
        path, source = os.path.join(root, name), name.replace(os.sep, "/")
        for doc, (chunks, nbytes) in enumerate(_documents(path, text_field, bad)):
            counted = 0  # bytes of the document attributed to its pieces so far (progress only)
            for part, (text, last) in enumerate(cut_blocks(chunks, block_chars)):
                share = nbytes - counted if last else min(len(text), nbytes - counted)
                counted += share
                yield Piece(text, source, doc, part, last, share)


def read_documents(
    path: str | os.PathLike, *, text_field: str = "text", on_bad_input: str = "error"
) -> list[str]:
    """The whole documents of one file (convenience for tests and tools; not streaming)."""
    bad = _BadInput(on_bad_input, [])
    return ["".join(chunks) for chunks, _ in _documents(os.fspath(path), text_field, bad)]


def cut_blocks(chunks: Iterable[str], block_chars: int) -> Iterator[tuple[str, bool]]:
    """Re-cut a document given as text chunks into blocks of at most `block_chars` characters.

    Yields `(block, is_last)`. The cut points depend only on the text, not on how it arrived
    in chunks, so a streamed file and the same text in one string give the same blocks.
    Empty documents yield nothing.
    """
    buffer, start, pending = "", 0, None
    for chunk in chunks:
        buffer = buffer[start:] + chunk
        start = 0  # an offset into buffer: slicing the rest off after each block would be quadratic
        while len(buffer) - start > block_chars:
            cut = _cut_point(buffer, start, block_chars)
            if pending is not None:
                yield pending, False
            pending, start = buffer[start:cut], cut
    if len(buffer) > start:
        if pending is not None:
            yield pending, False
        pending = buffer[start:]
    if pending is not None:
        yield pending, True


def _cut_point(text: str, start: int, block_chars: int) -> int:
    """Cut after the last line break in the block, else after a space, else hard at the limit.

    A break in the first half of the block is not used, so blocks stay reasonably full.
    """
    for sep in ("\n", " "):
        at = text.rfind(sep, start + block_chars // 2, start + block_chars)
        if at >= 0:
            return at + 1
    return start + block_chars


class _BadInput:
    """Raises `UserError` for a bad file or line, or records it when skipping."""

    def __init__(self, mode: str, skipped: list[dict]):
        if mode not in ON_BAD_INPUT:
            raise UserError(f"--on_bad_input must be one of {', '.join(ON_BAD_INPUT)}, not {mode!r}")
        self.mode, self.skipped = mode, skipped

    def __call__(self, path: str, line: int | None, reason: str, fix: str) -> None:
        where = f"{path}" if line is None else f"{path}:{line}"
        if self.mode == "error":
            raise UserError(f"{where}: {reason}; {fix} or pass --on_bad_input skip")
        self.skipped.append({"file": path, "line": line, "reason": reason})


def _documents(path: str, text_field: str, bad: _BadInput) -> Iterator[tuple[Iterable[str], int]]:
    """The documents of one file, each as (text chunks, bytes it accounts for)."""
    suffix = os.path.splitext(path)[1].lower()
    try:
        if suffix == ".jsonl":
            yield from _jsonl_documents(path, text_field, bad)
        elif suffix == ".json":
            yield from _json_documents(path, text_field, bad)
        else:
            yield from _text_documents(path, bad)
    except OSError as error:
        bad(path, None, f"cannot be read ({error.strerror or error})", "check its permissions")


def _text_documents(path: str, bad: _BadInput) -> Iterator[tuple[Iterable[str], int]]:
    # Check the encoding first: a file that turns out not to be UTF-8 half way must not have
    # had its first half emitted already when it is skipped.
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


def _first_non_utf8_line(path: str) -> int | None:
    """The 1-based line of the first byte that is not valid UTF-8, or None if all is valid."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line = 1
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_READ_CHUNK)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as error:
                return line + chunk.count(b"\n", 0, max(error.start, 0))
            if not chunk:
                return None
            line += chunk.count(b"\n")


def _json_documents(path: str, text_field: str, bad: _BadInput) -> Iterator[tuple[Iterable[str], int]]:
    with open(path, "rb") as f:
        raw = f.read()
    try:
        data = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        bad(path, line, "not UTF-8 text", "convert it to UTF-8 (e.g. with iconv)")
        return
    except json.JSONDecodeError as error:
        bad(path, error.lineno, f"malformed JSON ({error.msg})", "fix the JSON")
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
    for i, text in enumerate(texts):
        yield [text], len(raw) if i == len(texts) - 1 else 0


def _jsonl_documents(path: str, text_field: str, bad: _BadInput) -> Iterator[tuple[Iterable[str], int]]:
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, start=1):
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
                bad(path, line_number, f"malformed JSON ({error.msg})", "fix the line")
                continue
            text, problem = _text_of(item, text_field)
            if text is None:
                bad(path, line_number, problem, _FIELD_FIX)
            else:
                yield [text], len(raw)


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


_FIELD_FIX = "name the text field with --json_text_field"
