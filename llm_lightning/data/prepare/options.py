"""The options of `prepare`: one dataclass, its checks, and the command-line flags.

Everything here is checked before anything is read or written.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from llm_lightning.data.format import METADATA_FILE, is_merged, shard_name
from llm_lightning.data.sources import DEFAULT_EXTENSIONS, ON_BAD_INPUT
from llm_lightning.data.tokenizers import KINDS, check_kind, check_vocab_size
from llm_lightning.data.tokenizers.base import META_JSON
from llm_lightning.errors import ArgumentParser, UserError

DEFAULT_TOKENIZER_TYPE = "bpe"
DEFAULT_VOCAB_SIZE = 32000
DEFAULT_VAL_FRACTION = 0.01
DEFAULT_SEED = 1337
DEFAULT_TOKENIZER_TRAIN_CHARS = 500_000_000
MAX_VAL_FRACTION = 0.5

BATCH_CHARS = 1 << 19  # characters of text per batch sent to a worker
INFLIGHT_PER_WORKER = 3  # batches queued per worker: keeps workers busy, bounds memory
WRITE_TOKENS = 1 << 20  # tokens buffered per split before a write


def default_stride(max_length: int) -> int:
    """Windows overlap by half, up to 1024 tokens apart; never more than max_length."""
    return min(1024, max_length)


def default_block_chars(max_length: int) -> int:
    """Long documents are cut into blocks of about four windows of text (~4 chars per token)."""
    return 16 * (max_length + 1)


@dataclass(frozen=True)
class PrepareOptions:
    """The options of `prepare`, one per command-line flag (see `build_parser` for their help)."""

    tokenizer_type: str | None = None  # None: bpe, or the kind of `tokenizer`
    vocab_size: int | None = None  # None: DEFAULT_VOCAB_SIZE when a tokenizer is trained
    max_length: int = 2048
    stride: int | None = None  # None: default_stride(max_length)
    num_workers: int = 4
    val_fraction: float = DEFAULT_VAL_FRACTION
    seed: int = DEFAULT_SEED
    extensions: tuple[str, ...] = DEFAULT_EXTENSIONS
    text_field: str = "text"
    tokenizer: str | os.PathLike | None = None  # folder of a saved tokenizer to reuse
    tiktoken_encoding: str | None = None
    on_bad_input: str = "error"
    overwrite: bool = False
    tokenizer_train_chars: int = DEFAULT_TOKENIZER_TRAIN_CHARS
    num_shards: int | None = None  # None: one output; N: write 1/N of the corpus to OUT/shard-I-of-N
    shard_index: int | None = None
    tokenizer_only: bool = False  # train and save the tokenizer, nothing else
    block_chars: int | None = None  # None: default_block_chars(max_length); no flag
    progress: bool | None = None  # None: progress bars only when stderr is a terminal; no flag


def check_options(opts: PrepareOptions) -> str:
    """Check the flags; return the tokenizer kind ("" when a loaded tokenizer decides)."""
    if opts.max_length < 1:
        raise UserError(f"--max_length must be at least 1, not {opts.max_length}")
    if opts.stride is not None and not 1 <= opts.stride <= opts.max_length:
        raise UserError(f"--stride must be between 1 and --max_length ({opts.max_length}), not {opts.stride}")
    if opts.num_workers < 0:
        raise UserError(f"--num_workers must be 0 (encode in this process) or more, not {opts.num_workers}")
    if not 0 < opts.val_fraction <= MAX_VAL_FRACTION:
        raise UserError(
            f"--val_fraction must be above 0 and at most {MAX_VAL_FRACTION}, not {opts.val_fraction}"
        )
    if not opts.text_field:
        raise UserError("--text_field must not be empty; the default is 'text'")
    if opts.on_bad_input not in ON_BAD_INPUT:
        raise UserError(f"--on_bad_input must be one of {', '.join(ON_BAD_INPUT)}, not {opts.on_bad_input!r}")
    if opts.tokenizer_train_chars < 1:
        raise UserError(f"--tokenizer_train_chars must be at least 1, not {opts.tokenizer_train_chars}")
    if opts.block_chars is not None and opts.block_chars < 1:
        raise UserError(f"block_chars must be at least 1, not {opts.block_chars}")
    check_shard_options(opts)
    kind = opts.tokenizer_type
    if kind is not None:
        check_kind(kind)
    if opts.tokenizer is not None and opts.tiktoken_encoding is not None:
        raise UserError("--tokenizer and --tiktoken_encoding both name a tokenizer; pass only one")
    if opts.tiktoken_encoding is not None:
        if kind not in (None, "tiktoken"):
            raise UserError(f"--tiktoken_encoding needs --tokenizer_type tiktoken, not {kind}")
        return "tiktoken"
    if opts.tokenizer is not None:
        return kind or ""  # checked against the loaded tokenizer later
    kind = kind or DEFAULT_TOKENIZER_TYPE
    check_vocab_size(kind, opts.vocab_size or DEFAULT_VOCAB_SIZE)
    return kind


def check_shard_options(opts: PrepareOptions) -> None:
    """--num_shards/--shard_index go together and need a tokenizer made beforehand."""
    if opts.tokenizer_only and (opts.tokenizer is not None or opts.tiktoken_encoding is not None):
        raise UserError("--tokenizer_only trains a tokenizer; drop --tokenizer/--tiktoken_encoding")
    if opts.num_shards is None:
        if opts.shard_index is not None:
            raise UserError("--shard_index needs --num_shards (how many shards the corpus is cut into)")
        return
    if opts.tokenizer_only:
        raise UserError(
            "--tokenizer_only makes the one tokenizer all shards share; drop --num_shards/--shard_index"
        )
    if opts.num_shards < 1:
        raise UserError(f"--num_shards must be at least 1, not {opts.num_shards}")
    if opts.shard_index is None:
        raise UserError(
            f"--num_shards {opts.num_shards} needs --shard_index, which shard: 0 to {opts.num_shards - 1}"
        )
    if not 0 <= opts.shard_index < opts.num_shards:
        raise UserError(
            f"--shard_index {opts.shard_index} must be from 0 to --num_shards - 1 = {opts.num_shards - 1}"
        )
    if opts.tokenizer is None and opts.tiktoken_encoding is None:
        raise UserError(
            f"--num_shards {opts.num_shards}: every shard must use the same tokenizer; make it first with "
            "`llm-lightning prepare --tokenizer_only --output_dir TOK ...` and pass --tokenizer TOK"
        )


def check_output(input_dir: Path, output_dir: Path, overwrite: bool) -> None:
    source, target = input_dir.resolve(), output_dir.resolve()
    if target == source or source in target.parents:
        raise UserError(
            f"--output_dir {output_dir} is inside --input_dir {input_dir}; "
            "its files would be read as input next time; choose a folder outside it"
        )
    if not target.exists():
        return
    if not target.is_dir():
        raise UserError(f"--output_dir {output_dir} is a file; choose a folder")
    if not any(target.iterdir()):
        return  # an empty folder is simply filled
    if not overwrite:
        raise UserError(f"--output_dir {output_dir} already exists; pass --overwrite to replace it")
    if not (target / METADATA_FILE).is_file() and not (target / META_JSON).is_file():
        raise UserError(
            f"--output_dir {output_dir} is not empty and is not a prepare output (no {METADATA_FILE}); "
            "--overwrite only replaces a prepare output or a tokenizer folder; choose another folder"
        )
    if target in source.parents:
        raise UserError(
            f"--input_dir {input_dir} is inside --output_dir {output_dir}, which --overwrite would delete; "
            "move the input or choose another output folder"
        )


def output_folder(output_dir: Path, opts: PrepareOptions) -> Path:
    """Where this run writes: OUT, or OUT/shard-I-of-N for one shard of a sharded prepare."""
    if opts.num_shards is None:
        return output_dir
    return output_dir / shard_name(opts.shard_index, opts.num_shards)


def check_shard_output(input_dir: Path, output_dir: Path, shard: Path, overwrite: bool) -> None:
    """OUT holds the shards (and once merged, their merged metadata); the shard is an output of its own."""
    source, target = input_dir.resolve(), output_dir.resolve()
    if target == source or source in target.parents:
        check_output(input_dir, output_dir, overwrite)  # says why
    if target.exists() and not target.is_dir():
        raise UserError(f"--output_dir {output_dir} is a file; choose a folder")
    if (target / METADATA_FILE).is_file():
        if not _merged(target / METADATA_FILE):
            raise UserError(
                f"--output_dir {output_dir} holds an unsharded prepare output; give the shards a folder of their own"
            )
        if not overwrite:
            raise UserError(
                f"--output_dir {output_dir} is already merged; pass --overwrite to replace {shard.name} "
                "(then run merge-shards again)"
            )
    check_output(input_dir, shard, overwrite)


def _merged(path: Path) -> bool:
    try:
        return is_merged(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return False


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="llm-lightning prepare",
        description="Turn a folder of raw text (.txt .md .json .jsonl .parquet, plain or .gz/.zst compressed, "
        "recursive) into a trained tokenizer "
        "and train/val token files (OUT/tokenizer.json, OUT/dataset/{train,val}.bin, OUT/metadata.json).",
    )
    add = parser.add_argument
    # fmt: off
    add("--input_dir", metavar="DIR", required=True, help="folder of text files, read recursively (required)")
    add("--output_dir", metavar="DIR", required=True, help="folder to write, outside --input_dir (required)")
    add("--tokenizer_type", choices=KINDS, metavar="KIND",
        help="bpe: byte-level BPE (GPT-2 style); wordpiece: BERT-style WordPiece; tiktoken: byte-level BPE "
        "with the GPT-4 split pattern, served by tiktoken (default: bpe, or the kind of --tokenizer)")
    add("--vocab_size", type=int, metavar="N",
        help=f"vocabulary size to train (default: {DEFAULT_VOCAB_SIZE}); a tiny corpus may give fewer")
    add("--max_length", type=int, default=2048, metavar="N",
        help="tokens per training sequence; a window is max_length+1 tokens (default: 2048)")
    add("--stride", type=int, metavar="N",
        help="tokens between the starts of consecutive windows, 1..max_length; recorded for training "
        "(default: the smaller of 1024 and --max_length)")
    add("--num_workers", type=int, default=4, metavar="N",
        help="encoding processes; 0 encodes in this process; the output is the same for any value (default: 4)")
    add("--val_fraction", type=float, default=DEFAULT_VAL_FRACTION, metavar="F",
        help="share of documents (or blocks of long ones) held out for validation by a seeded hash, "
        f"topped up to at least one window (default: {DEFAULT_VAL_FRACTION})")
    add("--seed", type=int, default=DEFAULT_SEED, metavar="N",
        help=f"seed of the train/val split and of the tokenizer's sample (default: {DEFAULT_SEED})")
    add("--extensions", nargs="+", default=list(DEFAULT_EXTENSIONS), metavar="EXT",
        help=f"file extensions to read (default: {' '.join(DEFAULT_EXTENSIONS)})")
    add("--text_field", "--json_text_field", dest="text_field", default="text", metavar="FIELD",
        help="field holding the text in .json/.jsonl objects, column in .parquet files (default: text; "
        "--json_text_field is the same flag)")
    add("--tokenizer", metavar="DIR",
        help="reuse the tokenizer of an earlier prepare output (or a saved tokenizer folder) instead of training")
    add("--tiktoken_encoding", metavar="NAME",
        help="use a named tiktoken encoding such as cl100k_base, only if its file is already in the local "
        "tiktoken cache (TIKTOKEN_CACHE_DIR); nothing is downloaded")
    add("--on_bad_input", choices=ON_BAD_INPUT, default="error",
        help="error: stop at the first malformed, non-UTF-8 or text-less file or line; skip: leave it out, "
        "list it in metadata.json and report it at the end (default: error)")
    add("--overwrite", action="store_true", help="replace --output_dir if it holds an earlier prepare output")
    add("--tokenizer_train_chars", type=int, default=DEFAULT_TOKENIZER_TRAIN_CHARS, metavar="N",
        help="train the tokenizer on at most this many characters, sampled evenly over the train split "
        f"(default: {DEFAULT_TOKENIZER_TRAIN_CHARS:,})")
    add("--tokenizer_only", action="store_true",
        help="train and save only the tokenizer (on the same seeded sample), for the shards of a sharded "
        "prepare to share with --tokenizer")
    add("--num_shards", type=int, metavar="N",
        help="prepare 1/N of the corpus (by file; by document when there are fewer files than N) into "
        "OUT/shard-I-of-N; needs --tokenizer; `llm-lightning merge-shards` then joins the N shards")
    add("--shard_index", type=int, metavar="I", help="which shard, 0..N-1 (e.g. $SLURM_ARRAY_TASK_ID)")
    # fmt: on
    return parser


def options_from_argv(argv: list[str] | None) -> tuple[str, str, PrepareOptions]:
    """(input_dir, output_dir, options) from the command line."""
    values = vars(build_parser().parse_args(argv))
    values["extensions"] = tuple(values["extensions"])
    return values.pop("input_dir"), values.pop("output_dir"), PrepareOptions(**values)
