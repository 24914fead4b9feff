"""`llm-lightning prepare`: a folder of raw text -> a tokenizer and train/val token files.

The pipeline, each step streaming so that the corpus is never in memory:

1. options.py: check every flag and the input and output folders before anything is written.
2. read.py: read the files as pieces (data/sources/), decide each piece's split by a seeded hash,
   and train the tokenizer on a seeded sample of the train split (or load one).
3. encode.py: encode with `--num_workers` processes, in input order, so the output is the
   same for any worker count.
4. write.py: append each piece to its split's token file, each document followed by the
   end-of-text id; top val up to one window from the end of train if needed.

Everything is written into a work folder beside OUT (io.atomic.AtomicFolder), metadata.json
last, and renamed to OUT at the end: a killed run never leaves an OUT that looks complete, and
an old OUT (replaced only with --overwrite) stays intact until then.

Across machines (a job array): `--tokenizer_only` writes just the tokenizer, trained on the
same sample a whole prepare would use; then `--num_shards N --shard_index I --tokenizer TOK`
writes shard I (read.py says which files or documents) as a complete prepared folder
OUT/shard-I-of-N, and `llm-lightning merge-shards` describes the N of them as one folder
(format.py). Replacing a shard of a merged OUT removes OUT/metadata.json when the new shard is
in place: the merge must be redone.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from llm_lightning.data.format import METADATA_FILE, split_file, token_dtype, write_metadata
from llm_lightning.data.prepare.options import (
    PrepareOptions,
    check_options,
    check_output,
    check_shard_output,
    default_stride,
    options_from_argv,
    output_folder,
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
    """Prepare into `output_dir` (its shard folder for a sharded prepare); return the folder written."""
    started = time.perf_counter()
    kind = check_options(opts)
    files = find_files(input_dir, normalize_extensions(opts.extensions))
    target = output_folder(output_dir, opts)
    if target == output_dir:
        check_output(input_dir, output_dir, opts.overwrite)
    else:
        check_shard_output(input_dir, output_dir, target, opts.overwrite)
    corpus = Corpus(input_dir, files, opts)
    if opts.tokenizer_only:
        return save_tokenizer(kind, corpus, output_dir, opts)
    stride = opts.stride or default_stride(opts.max_length)
    with AtomicFolder(target) as folder:
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
            "num_files": len(corpus.files),
            "sources": corpus.files,
            "skipped": corpus.skipped,
            **({"shard": corpus.shard} if corpus.shard else {}),
        }
        write_metadata(folder.work, metadata)  # last: its presence means "complete"
        if target != output_dir:  # a merge of the old shards no longer describes OUT
            (output_dir / METADATA_FILE).unlink(missing_ok=True)
        folder.commit()
    report(target, metadata, opts.vocab_size, time.perf_counter() - started)
    return target


def save_tokenizer(kind: str, corpus: Corpus, output_dir: Path, opts: PrepareOptions) -> Path:
    """--tokenizer_only: the tokenizer a whole prepare would train, alone in `output_dir`."""
    with AtomicFolder(output_dir) as folder:
        tok, info = get_tokenizer(kind, corpus, opts)
        tok.save(folder.work)
        folder.commit()
    print(
        f"saved a {tok.kind} tokenizer of {tok.vocab_size:,} tokens (trained on {info['trained_on_chars']:,} "
        f"characters) to {output_dir}; prepare the shards with --tokenizer {output_dir}"
    )
    return output_dir


def main(argv: list[str] | None = None) -> int:
    input_dir, output_dir, opts = options_from_argv(argv)
    run(Path(input_dir), Path(output_dir), opts)
    return 0
