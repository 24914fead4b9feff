"""Reading a folder of raw text as one stream of document pieces.

- Files are found recursively and read in sorted order of their path relative to the input
  folder, so the stream (and everything derived from it) is the same on every run and machine.
  Hidden files and folders (names starting with ".") are left out.
- Which files: a file is read when its name ends with one of the extensions (case does not
  matter), and multi-part extensions count whole. So `.jsonl` does not take `a.jsonl.gz` (that
  name ends in `.gz`), `.jsonl.gz` takes only gzipped JSONL, and `.gz` alone takes every gzip
  file. The defaults are the five formats below and the `.gz` and `.zst` forms of the four text
  formats.
- Formats: `.txt` and `.md` are one document per file; `.json` holds an object with the text
  field, a list of such objects, or a list of strings; `.jsonl` holds one object (or string)
  per line; `.parquet` holds one document per row, in the column named by `text_field` (a
  string column, or a binary one holding UTF-8). Any other extension asked for with
  `--extensions` is read as plain text.
- Compression: a name ending in `.gz` (gzip) or `.zst` (Zstandard) is decompressed as it is
  read and its format is that of the extension under the compression suffix (`a.jsonl.zst` is
  JSONL, `a.csv.gz` asked for as `.csv.gz` or `.gz` is plain text). It gives exactly the
  documents of the uncompressed file. Parquet compresses its own data, so `.parquet.gz` is
  refused.
- Documents longer than `block_chars` are cut into contiguous blocks at a line break (else a
  space) so that a corpus of one or a few huge files can still be split into train and val,
  and so that a huge text file is read a block at a time instead of whole.
- Memory: text files stream a block at a time, JSONL a line at a time (compressed or not),
  Parquet a row group (of the text column only) and a few hundred rows of Python strings at a
  time; a `.json` file is parsed whole (JSON has no cheap streaming parser), one file at a time.
- Bad input (malformed JSON, a missing text field or column, a null row, bytes that are not
  UTF-8, a truncated or corrupt gzip/zstd stream, a file that is not Parquet) raises a
  `UserError` naming the file and line (rows of Parquet and items of JSON lists are named in
  the message, counting from 0), or with `on_bad_input="skip"` is skipped and recorded. A whole
  text document (`.txt`, `.md`, compressed or not) is checked before any of it is given out, so
  a skipped file never leaves its first half behind; for JSONL and Parquet the lines or rows
  given out before a bad one stay, and a bad stream ends its file there.
- Progress: `Piece.nbytes` counts bytes on disk (compressed bytes for compressed files, shared
  among the documents read from them), so the pieces of a corpus add up to about its size.
"""

from __future__ import annotations

import codecs
import gzip
import io
import json
import os
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from llm_lightning.errors import UserError

_TEXT_FORMATS = (".txt", ".md", ".json", ".jsonl")
_COMPRESSIONS = {".gz": "gzip", ".zst": "zstd"}  # suffix -> name used in messages
DEFAULT_EXTENSIONS = (
    *_TEXT_FORMATS,
    ".parquet",
    *(ext + suffix for suffix in _COMPRESSIONS for ext in _TEXT_FORMATS),
)
ON_BAD_INPUT = ("error", "skip")
DEFAULT_BLOCK_CHARS = 32768

_READ_CHUNK = 1 << 20  # bytes/chars read from a file at a time
_CHECK_CHUNK = 1 << 14  # decompressed bytes read at a time when checking (finer line numbers)
_KEEP_DECOMPRESSED = 4 << 20  # a compressed text file up to this size (decompressed) is read once
_PARQUET_BATCH_ROWS = 256  # rows turned into Python strings at a time
_ZSTD_INPUT = 1 << 16  # compressed bytes read from a .zst file at a time
_ZSTD_OUTPUT = 1 << 20  # about the most decompressed bytes made in one step (see _ZstdReader)
_ZSTD_BLIND = 1 << 11  # the most input fed in one step before any output shows the ratio
_STREAM_FIX = "re-create or re-download the file"
_FIELD_FIX = "name the text field with --text_field"
_COLUMN_FIX = "name the text column with --text_field"


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
    """`txt`, `.TXT` and `.txt` all mean `.txt`; `jsonl.GZ` means `.jsonl.gz`."""
    result = []
    for ext in extensions:
        ext = ext.strip().lower()
        if not ext.strip(".") or ".." in ext or "/" in ext or "\\" in ext:
            raise UserError(
                f"--extensions: {ext!r} is not a file extension; "
                "use e.g. .txt .md .json .jsonl .parquet .jsonl.gz"
            )
        result.append(ext if ext.startswith(".") else "." + ext)
    return tuple(dict.fromkeys(result))


def find_files(input_dir: str | os.PathLike, extensions: Iterable[str] = DEFAULT_EXTENSIONS) -> list[str]:
    """Paths (relative to `input_dir`, "/"-separated, sorted) of all files with one of `extensions`.

    A file matches an extension when its name ends with it, so multi-part extensions such as
    `.jsonl.gz` match whole and `.jsonl` does not match `a.jsonl.gz`. Kept as short strings: a
    corpus can have millions of files.
    """
    root = Path(input_dir)
    if not root.exists():
        raise UserError(f"--input_dir {root} does not exist; point it at a folder of text files")
    if not root.is_dir():
        raise UserError(f"--input_dir {root} is not a folder; point it at a folder of text files")
    extensions = normalize_extensions(extensions)
    found, seen_any, visited = [], False, set()
    # Symbolic links are followed, to folders as to files; a folder reached twice (a link loop,
    # or two links to one place) is read once. A link to nothing is listed and reported as a
    # bad input when it is read.
    for folder, subfolders, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in visited:
            subfolders[:] = []
            continue
        visited.add(real)
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]
        prefix = Path(folder).relative_to(root).as_posix()
        for name in names:
            if name.startswith("."):
                continue
            seen_any = True
            if name.lower().endswith(extensions):
                found.append(name if prefix == "." else f"{prefix}/{name}")
    if not seen_any:
        raise UserError(
            f"--input_dir {root} is empty; add .txt, .md, .json, .jsonl or .parquet files "
            "(the text formats may be .gz or .zst compressed)"
        )
    if not found:
        raise UserError(f"--input_dir {root} has no {_describe(extensions)}; add some or change --extensions")
    return sorted(found)


def _split_compression(ext: str) -> tuple[str, str]:
    """`.jsonl.gz` -> (`.jsonl`, `.gz`); `.txt` -> (`.txt`, ``); `.gz` alone -> (`.gz`, ``)."""
    for suffix in _COMPRESSIONS:
        inner = ext[: -len(suffix)]
        if ext.endswith(suffix) and inner.strip("."):
            return inner, suffix
    return ext, ""


def _describe(extensions: tuple[str, ...]) -> str:
    """The extensions in words, the compressed forms folded into their format.

    The defaults read ".txt .md .json .jsonl files (plain, .gz or .zst) or .parquet files".
    """
    forms: dict[str, set[str]] = {}
    for ext in extensions:
        inner, suffix = _split_compression(ext)
        forms.setdefault(inner, set()).add(suffix)
    groups: list[tuple[list[str], tuple[str, ...]]] = []
    for inner, suffixes in forms.items():
        key = tuple(sorted(suffixes))
        if groups and groups[-1][1] == key:
            groups[-1][0].append(inner)
        else:
            groups.append(([inner], key))
    words = []
    for inners, suffixes in groups:
        if suffixes == ("",):
            words.append(f"{' '.join(inners)} files")
        elif "" in suffixes:
            options = ["plain", *(s for s in suffixes if s)]
            words.append(f"{' '.join(inners)} files ({', '.join(options[:-1])} or {options[-1]})")
        else:
            words.append(f"{' '.join(i + s for i in inners for s in suffixes)} files")
    return " or ".join(words)


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
    carried = 0  # bytes of empty documents, counted with the next piece (progress only)
    for name in files:
        name = os.fspath(name)  # plain strings: pathlib costs more than reading a small file
        path, source = os.path.join(root, name), name.replace(os.sep, "/")
        for doc, (chunks, nbytes) in enumerate(_documents(path, text_field, bad)):
            nbytes += carried  # with those of empty documents before it
            carried = nbytes  # until one of its pieces takes them
            counted = 0  # bytes of the document attributed to its pieces so far
            for part, (text, last) in enumerate(cut_blocks(chunks, block_chars)):
                share = nbytes - counted if last else min(len(text), nbytes - counted)
                counted += share
                carried = 0
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


def _format_of(path: str) -> tuple[str, str | None]:
    """(format extension, compression suffix or None): `a.JSONL.gz` -> (`.jsonl`, `.gz`)."""
    name = path.lower()
    for suffix in _COMPRESSIONS:
        if name.endswith(suffix):
            return os.path.splitext(name[: -len(suffix)])[1], suffix
    return os.path.splitext(name)[1], None


def _documents(path: str, text_field: str, bad: _BadInput) -> Iterator[tuple[Iterable[str], int]]:
    """The documents of one file, each as (text chunks, bytes it accounts for)."""
    suffix, compression = _format_of(path)
    if os.path.islink(path) and not os.path.exists(path):
        bad(path, None, "a symbolic link to nothing", "fix or remove the link")
        return
    try:
        if suffix == ".parquet" and compression:
            bad(
                path,
                None,
                f"a {_COMPRESSIONS[compression]}-compressed Parquet file",
                "decompress it (Parquet compresses its data itself)",
            )
        elif suffix == ".parquet":
            yield from _parquet_documents(path, text_field, bad)
        elif suffix == ".jsonl":
            yield from _jsonl_documents(path, text_field, bad, compression)
        elif suffix == ".json":
            yield from _json_documents(path, text_field, bad, compression)
        else:
            yield from _text_documents(path, bad, compression)
    except OSError as error:
        bad(path, None, f"cannot be read ({error.strerror or error})", "check its permissions")


# ---------------------------------------------------------------------------------------------
# Compressed streams


class _StreamError(Exception):
    """A compressed stream that is corrupt (or, `state`, cannot be read for another reason)."""

    def __init__(self, message: str, state: str = "corrupt"):
        super().__init__(message)
        self.state = state


class _TruncatedStream(EOFError):
    """A compressed stream that ends before its end marker (gzip raises EOFError for this)."""


# What reading a damaged compressed stream raises. gzip.BadGzipFile is an OSError: it must be
# caught before the "cannot be read" handler in _documents sees it.
_STREAM_ERRORS = (EOFError, zlib.error, gzip.BadGzipFile, _StreamError)


def _stream_problem(compression: str, error: BaseException) -> str:
    kind = _COMPRESSIONS[compression]
    state = "truncated" if isinstance(error, EOFError) else getattr(error, "state", "corrupt")
    return f"{kind} stream is {state} ({_one_line(error)})"


def _one_line(error: BaseException, limit: int = 200) -> str:
    text = "".join(c if c.isprintable() else " " for c in str(error))
    text = " ".join(text.split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _CountingReader:
    """A file's `read`, counting the bytes it gave (the compressed bytes read so far)."""

    def __init__(self, file: BinaryIO):
        self._file, self.count = file, 0

    def read(self, size: int = -1) -> bytes:
        data = self._file.read(size)
        self.count += len(data)
        return data


class _ZstdReader(io.RawIOBase):
    """Zstandard frames decoded incrementally, raising on a stream that ends inside a frame.

    zstandard's own stream_reader ends quietly at a truncated frame. Its decompressobj tells
    (`eof` stays False), but returns all the output of the input it is given at once, so the
    input goes in slices sized from the last ratio seen, for about _ZSTD_OUTPUT bytes of output
    each; data far more compressible than what came before it can overshoot once.
    """

    def __init__(self, source: _CountingReader, zstd):
        super().__init__()
        self._source, self._zstd = source, zstd
        # Windows up to 128 MiB, as the zstd command line (a damaged header could ask for 2 GiB).
        self._decompressor = zstd.ZstdDecompressor()
        self._frame = None  # the decompressobj of the frame being read; None between frames
        self._input, self._input_at = b"", 0
        self._output, self._output_at = memoryview(b""), 0
        self._slice = 256  # input bytes for the next step; small until the ratio is known

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self._output_at >= len(self._output):
            if not self._step():
                return 0
        n = min(len(buffer), len(self._output) - self._output_at)
        buffer[:n] = self._output[self._output_at : self._output_at + n]
        self._output_at += n
        return n

    def _step(self) -> bool:
        """Decode the next slice of input; False at the end of the stream."""
        if self._input_at >= len(self._input):
            self._input, self._input_at = self._source.read(_ZSTD_INPUT), 0
            if not self._input:
                if self._frame is not None:
                    raise _TruncatedStream("the data ends inside a zstd frame")
                return False
        piece = self._input[self._input_at : self._input_at + self._slice]
        self._input_at += len(piece)
        if self._frame is None:
            self._frame = self._decompressor.decompressobj()
        try:
            output = self._frame.decompress(piece)
        except self._zstd.ZstdError as error:
            if "too much memory" in str(error):  # made with zstd --long=31, say
                raise _StreamError(f"{error}; it needs a window over 128 MiB", "too big to decode") from None
            raise _StreamError(str(error)) from None
        used = len(piece)
        if self._frame.eof:  # the frame ended inside this slice; the rest starts the next frame
            rest = self._frame.unused_data
            used -= len(rest)
            self._frame = None
            if rest:
                self._input, self._input_at = rest + self._input[self._input_at :], 0
        if output and used > 0:
            self._slice = max(64, min(_ZSTD_INPUT, used * _ZSTD_OUTPUT // len(output)))
        elif not output:  # a block not complete yet; the ratio is still what it was
            self._slice = min(max(_ZSTD_BLIND, self._slice), self._slice * 2)
        self._output, self._output_at = memoryview(output), 0
        return True


class _OneReadAtATime(io.RawIOBase):
    """A buffered stream as a raw one that reads once per call.

    Buffering gzip again makes it decompress 64 kB at a time instead of 8 kB (faster), but a
    buffer filling itself from a buffered stream reads it again and again, and loses the data
    of the reads before one that raises (e.g. at a truncated end): reading once keeps it.
    """

    def __init__(self, stream: BinaryIO):
        super().__init__()
        self._stream = stream

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        return self._stream.readinto1(buffer)  # type: ignore[attr-defined]

    def close(self) -> None:
        self._stream.close()
        super().close()


def _zstandard(path: str):
    try:
        import zstandard
    except ImportError:
        raise UserError(
            f"{path}: reading .zst files needs the zstandard package; pip install zstandard"
        ) from None
    return zstandard


@contextmanager
def _open_binary(path: str, compression: str | None) -> Iterator[tuple[BinaryIO, _CountingReader | None]]:
    """The file's (decompressed) bytes, and a count of the bytes read from disk (None if plain)."""
    with open(path, "rb") as file:
        if compression is None:
            yield file, None
            return
        counter = _CountingReader(file)
        if compression == ".gz":
            gzip_file = gzip.GzipFile(fileobj=counter, mode="rb")  # type: ignore[arg-type]
            stream: BinaryIO = io.BufferedReader(_OneReadAtATime(gzip_file), buffer_size=1 << 16)
        else:
            stream = io.BufferedReader(_ZstdReader(counter, _zstandard(path)), buffer_size=1 << 16)
        with stream:
            yield stream, counter


# ---------------------------------------------------------------------------------------------
# Text


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
                    bad(path, line_number, f"malformed JSON ({error.msg} at column {error.colno})", "fix the line")
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


# ---------------------------------------------------------------------------------------------
# Parquet


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
