"""`llm-lightning consolidate`: a sharded checkpoint folder -> one ordinary checkpoint file.

The sharded strategies (configs/strategy/fsdp.yaml, tp.yaml, fsdp_tp.yaml) save checkpoints as
folders of per-rank shards. validate, generate, export and `fit --ckpt_path` read such folders
directly; this writes one file for everything else (copying one file, another tool). One
process reads every rank's shards; no GPU or process group is needed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from llm_lightning.errors import ArgumentParser, UserError
from llm_lightning.io.atomic import atomic_write
from llm_lightning.io.checkpoint import consolidate, is_sharded, load_checkpoint


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="llm-lightning consolidate",
        description="Write a sharded checkpoint folder as one ordinary .ckpt file (weights, optimizer, loops).",
    )
    parser.add_argument(
        "--ckpt_path", required=True, help="a sharded checkpoint folder, e.g. checkpoints/last.ckpt"
    )
    parser.add_argument("--output", required=True, help="the .ckpt file to write")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing output file (only an earlier checkpoint)",
    )
    return parser


def check_output(output: Path, overwrite: bool) -> None:
    """--overwrite replaces an earlier checkpoint file only, never another file or a folder."""
    if not output.exists() and not output.is_symlink():
        return
    if not overwrite:
        raise UserError(f"--output {output}: already exists; pass --overwrite to replace it")
    if not output.is_file():
        raise UserError(
            f"--output {output}: not a file; --overwrite only replaces an earlier checkpoint file"
        )
    try:
        load_checkpoint(output, "--output", mmap=True)
    except UserError:
        raise UserError(
            f"--output {output}: not an llm-lightning checkpoint; --overwrite only replaces an earlier "
            "output (a .ckpt file), never another file: choose another --output"
        ) from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    folder, output = Path(args.ckpt_path), Path(args.output)
    if not is_sharded(folder):
        raise UserError(
            f"--ckpt_path {folder}: not a sharded checkpoint folder (an ordinary file needs no consolidation)"
        )
    if output.resolve() == folder.resolve() or folder.resolve() in output.resolve().parents:
        raise UserError(f"--output {output}: inside the checkpoint folder; write it elsewhere")
    check_output(output, args.overwrite)
    checkpoint = consolidate(folder)
    try:
        atomic_write(output, lambda stream: torch.save(checkpoint, stream))
    except OSError as error:
        raise UserError(f"--output {output}: cannot write there ({error.strerror})") from None
    print(f"consolidated {folder} (step {checkpoint.get('global_step')}) -> {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
