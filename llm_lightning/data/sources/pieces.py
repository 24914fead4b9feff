"""The stream of pieces: each file's documents by format, cut into blocks of at most `block_chars`."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from llm_lightning.data.sources.bad_input import _BadInput
from llm_lightning.data.sources.files import _COMPRESSIONS, _format_of
from llm_lightning.data.sources.parquet import _parquet_documents
from llm_lightning.data.sources.text import _json_documents, _jsonl_documents, _text_documents

DEFAULT_BLOCK_CHARS = 32768


@dataclass(frozen=True)
class Piece:
    """A document, or one block of a long document: the unit of the train/val split."""

    text: str
    source: str  # file path relative to the input folder, "/"-separated
    doc: int  # index of the document within its file
    part: int  # index of this block within its document (0 when the document is whole)
    last: bool  # True when this piece ends its document
    nbytes: int = 0  # input bytes this piece accounts for (for progress only)


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
