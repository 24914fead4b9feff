"""Finding the input files: extensions, the formats and compressions they name, and the search."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from llm_lightning.errors import UserError

_TEXT_FORMATS = (".txt", ".md", ".json", ".jsonl")
_COMPRESSIONS = {".gz": "gzip", ".zst": "zstd"}  # suffix -> name used in messages
DEFAULT_EXTENSIONS = (
    *_TEXT_FORMATS,
    ".parquet",
    *(ext + suffix for suffix in _COMPRESSIONS for ext in _TEXT_FORMATS),
)


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


def _format_of(path: str) -> tuple[str, str | None]:
    """(format extension, compression suffix or None): `a.JSONL.gz` -> (`.jsonl`, `.gz`)."""
    name = path.lower()
    for suffix in _COMPRESSIONS:
        if name.endswith(suffix):
            return os.path.splitext(name[: -len(suffix)])[1], suffix
    return os.path.splitext(name)[1], None
