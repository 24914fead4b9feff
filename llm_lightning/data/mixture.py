"""The data folders of a run (`--data.data_dir`, one or a list) as named sources, checked together.

- A source is a prepared or merged folder (format.py); its token files are one per shard.
- Its name is the folder's name (`.../web/` -> `web`), used in `val/loss/<name>` and
  `train/epochs/<name>`. Folders that share a name get their position in the list appended
  (`data-0`, `data-1`).
- All sources must share one tokenizer (the fingerprint of its files) and max_length: a
  mixture is one model's data. Their recorded strides must agree unless `--data.stride` says.
- `--data.weights`: one non-negative number per folder, not all 0, the share of training
  windows drawn from each (normalised). A weight of 0 keeps a folder for validation only.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from llm_lightning.data.format import read_metadata, split_files
from llm_lightning.data.tokenizers import fingerprint, tokenizer_files
from llm_lightning.errors import UserError


@dataclass
class Source:
    name: str
    folder: Path
    metadata: dict
    tokenizer_files: dict[str, str]

    def files(self, split: str) -> list[Path]:
        return split_files(self.folder, self.metadata, split)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.tokenizer_files)

    @property
    def val_bytes_per_token(self) -> float | None:
        """UTF-8 bytes of val text per val token, for bits per byte (None: not recorded by prepare)."""
        tokens = self.metadata.get("num_tokens", {}).get("val")
        text = (self.metadata.get("num_bytes") or {}).get("val")
        return text / tokens if tokens and text else None


def source_names(folders: list[Path]) -> list[str]:
    names = [folder.resolve().name or str(folder) for folder in folders]
    shared = {name for name, count in Counter(names).items() if count > 1}
    return [f"{name}-{i}" if name in shared else name for i, name in enumerate(names)]


def open_sources(data_dir: str | list[str]) -> list[Source]:
    """Every folder of `--data.data_dir`, read and checked against the first."""
    folders = [Path(d) for d in ([data_dir] if isinstance(data_dir, str | Path) else data_dir)]
    if not folders:
        raise UserError("--data.data_dir is an empty list; give a prepared folder or a list of them")
    seen = Counter(folder.resolve() for folder in folders)
    twice = [str(folder) for folder in folders if seen[folder.resolve()] > 1]
    if twice:
        raise UserError(
            f"--data.data_dir lists {twice[0]} twice; give each folder once and weigh them with --data.weights"
        )
    sources = [
        Source(name, folder, read_metadata(folder), tokenizer_files(folder))
        for name, folder in zip(source_names(folders), folders, strict=True)
    ]
    check_together(sources)
    return sources


def check_together(sources: list[Source]) -> None:
    first = sources[0]
    for other in sources[1:]:
        if other.fingerprint != first.fingerprint:
            raise UserError(
                f"--data.data_dir: {other.folder} and {first.folder} were made with different tokenizers "
                f"({other.metadata.get('tokenizer_type')} {other.fingerprint} vs "
                f"{first.metadata.get('tokenizer_type')} {first.fingerprint}); a mixture needs one: prepare "
                f"{other.folder} again with --tokenizer {first.folder}"
            )
        if other.metadata["max_length"] != first.metadata["max_length"]:
            raise UserError(
                f"--data.data_dir: {other.folder} has max_length {other.metadata['max_length']} but {first.folder} "
                f"has {first.metadata['max_length']}; prepare both with the same --max_length"
            )


def common_stride(sources: list[Source], stride: int | None) -> int:
    """--data.stride, or the stride the folders were prepared with (which must then agree)."""
    if stride is not None:
        return stride
    strides = {source.metadata["stride"] for source in sources}
    if len(strides) > 1:
        listed = ", ".join(f"{s.folder} {s.metadata['stride']}" for s in sources)
        raise UserError(
            f"--data.data_dir folders were prepared with different strides ({listed}); pass --data.stride"
        )
    return strides.pop()


def normalized_weights(weights: list[float] | None, sources: list[Source]) -> list[float] | None:
    """--data.weights as shares that sum to 1 (None: proportional to the folders' windows)."""
    if weights is None:
        return None
    if len(weights) != len(sources):
        raise UserError(
            f"--data.weights has {len(weights)} value(s) for {len(sources)} folder(s) in --data.data_dir; "
            "give one weight per folder"
        )
    bad = [w for w in weights if not math.isfinite(w) or w < 0]
    if bad or not sum(weights) > 0:
        what = f"{bad[0]} is not a non-negative number" if bad else "all are 0"
        raise UserError(f"--data.weights {list(weights)}: {what}; give each folder a weight >= 0, not all 0")
    total = sum(weights)
    return [w / total for w in weights]
