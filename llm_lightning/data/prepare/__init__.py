"""`llm-lightning prepare`: a folder of raw text -> a tokenizer and train/val token files.

The pipeline, each step streaming so that the corpus is never in memory:

1. options.py: check every flag and the input and output folders before anything is written.
2. read.py: read the files as pieces (sources.py), decide each piece's split by a seeded hash,
   and train the tokenizer on a seeded sample of the train split (or load one).
3. encode.py: encode with `--num_workers` processes, in input order, so the output is the
   same for any worker count.
4. write.py: append each piece to its split's token file, each document followed by the
   end-of-text id; top val up to one window from the end of train if needed.

Everything is written into a work folder beside OUT (io.atomic.AtomicFolder), metadata.json
last, and renamed to OUT at the end: a killed run never leaves an OUT that looks complete, and
an old OUT (replaced only with --overwrite) stays intact until then.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from llm_lightning.data.format import split_file, token_dtype, write_metadata
from llm_lightning.data.prepare.options import (
    PrepareOptions,
    check_options,
    check_output,
    default_stride,
    options_from_argv,
)
from llm_lightning.data.prepare.progress import report
from llm_lightning.data.prepare.read import Corpus, get_tokenizer
from llm_lightning.data.prepare.write import encode_corpus
from llm_lightning.data.sources import find_files, normalize_extensions
from llm_lightning.io.atomic import AtomicFolder

__all__ = ["PrepareOptions", "main", "prepare"]


def prepare(input_dir: str | os.PathLike, output_dir: str | os.PathLike, **options) -> Path:
    """Prepare `input_dir` into `output_dir` (see the module docstring); returns `output_dir`.

    `options` are the fields of `PrepareOptions`, named like the command's flags:
    `prepare("raw", "out", vocab_size=8000, num_workers=2)`.
    """
    return run(Path(input_dir), Path(output_dir), PrepareOptions(**options))


def run(input_dir: Path, output_dir: Path, opts: PrepareOptions) -> Path:
    started = time.perf_counter()
    kind = check_options(opts)
    files = find_files(input_dir, normalize_extensions(opts.extensions))
    check_output(input_dir, output_dir, opts.overwrite)
    corpus = Corpus(input_dir, files, opts)
    stride = opts.stride or default_stride(opts.max_length)
    with AtomicFolder(output_dir) as folder:
        tok, tokenizer_info = get_tokenizer(kind, corpus, opts)
        tok.save(folder.work)
        counts = encode_corpus(tok, corpus, folder.work, opts)
        metadata = {
            "tokenizer_type": tok.kind,
            "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id,
            "tokenizer_fingerprint": tok.fingerprint,
            "dtype": token_dtype(tok.vocab_size).name,
            "max_length": opts.max_length,
            "stride": stride,
            "val_fraction": opts.val_fraction,
            "seed": opts.seed,
            **counts,
            "files": {split: split_file(split) for split in ("train", "val")},
            "tokenizer": tokenizer_info,
            "tokenizer_train_chars": opts.tokenizer_train_chars,
            "block_chars": corpus.block_chars,
            "extensions": list(normalize_extensions(opts.extensions)),
            "text_field": opts.text_field,
            "input_dir": str(input_dir.resolve()),
            "num_files": len(files),
            "sources": files,
            "skipped": corpus.skipped,
        }
        write_metadata(folder.work, metadata)  # last: its presence means "complete"
        folder.commit()
    report(output_dir, metadata, opts.vocab_size, time.perf_counter() - started)
    return output_dir


def main(argv: list[str] | None = None) -> int:
    input_dir, output_dir, opts = options_from_argv(argv)
    run(Path(input_dir), Path(output_dir), opts)
    return 0
