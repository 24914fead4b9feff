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
- Text size: compressed files hold 3-10x more text than their size on disk, so
  `estimated_text_bytes` reads what their trailer, header or footer says (gzip ISIZE, zstd frame
  content size, Parquet column sizes) for prepare's tokenizer sampling rate and shard balance.

The package, one file a step (each imports only those listed before it):

- files.py: the extensions, the formats and compressions they name, and `find_files`.
- bad_input.py: raising or recording bad input (`--on_bad_input`).
- streams.py: gzip and zstd streams decompressed as they are read, and their errors.
- text.py: plain text, JSON and JSONL documents, and the UTF-8 checks.
- parquet.py: Parquet documents, a row group at a time.
- sizes.py: `estimated_text_bytes`, from a file's size, trailer, header or footer.
- pieces.py: `iter_pieces`, each file's documents by format, cut into blocks (`cut_blocks`).
"""

from __future__ import annotations

from llm_lightning.data.sources.bad_input import ON_BAD_INPUT
from llm_lightning.data.sources.files import DEFAULT_EXTENSIONS, find_files, normalize_extensions
from llm_lightning.data.sources.pieces import (
    DEFAULT_BLOCK_CHARS,
    Piece,
    cut_blocks,
    iter_pieces,
    read_documents,
)
from llm_lightning.data.sources.sizes import COMPRESSION_RATIO, estimated_text_bytes

__all__ = [
    "COMPRESSION_RATIO",
    "DEFAULT_BLOCK_CHARS",
    "DEFAULT_EXTENSIONS",
    "ON_BAD_INPUT",
    "Piece",
    "cut_blocks",
    "estimated_text_bytes",
    "find_files",
    "iter_pieces",
    "normalize_extensions",
    "read_documents",
]
