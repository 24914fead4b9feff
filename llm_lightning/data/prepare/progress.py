"""What prepare shows while it runs (a bar on a terminal only) and the summary it prints."""

from __future__ import annotations

import sys
from pathlib import Path

from tqdm import tqdm

from llm_lightning.data.format import METADATA_FILE


def progress_bar(total: int, desc: str, progress: bool | None) -> tqdm:
    # disable=None: tqdm shows the bar only when stderr is a terminal (not in logs or pipes).
    return tqdm(
        total=total,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        disable=None if progress is None else not progress,
        file=sys.stderr,
        leave=False,
    )


def report(output_dir: Path, metadata: dict, vocab_size: int | None, seconds: float) -> None:
    tokens, docs = metadata["num_tokens"], metadata["num_documents"]
    total = tokens["train"] + tokens["val"]
    print(
        f"prepared {output_dir}: {metadata['num_files']} files, {docs['train']:,} train + {docs['val']:,} val "
        f"documents, {tokens['train']:,} train + {tokens['val']:,} val tokens, {metadata['tokenizer_type']} "
        f"vocabulary {metadata['vocab_size']:,}, {seconds:.1f} s ({total / max(seconds, 1e-9):,.0f} tokens/s)"
    )
    if vocab_size is not None and vocab_size != metadata["vocab_size"]:
        why = "the corpus is too small for more" if metadata["tokenizer"]["source"] == "trained" else "given"
        print(
            f"note: the vocabulary has {metadata['vocab_size']:,} tokens ({why}), not --vocab_size {vocab_size:,}"
        )
    skipped = metadata["skipped"]
    if skipped:
        first = skipped[0]
        where = first["file"] if first["line"] is None else f"{first['file']}:{first['line']}"
        print(
            f"warning: skipped {len(skipped)} bad files or lines (listed under 'skipped' in "
            f"{output_dir / METADATA_FILE}), first: {where}: {first['reason']}",
            file=sys.stderr,
        )
