"""The run log: `metrics.jsonl` beside a fit's checkpoints, one JSON record per line.

Written by the training side (training/callbacks/run_log.py), read by `monitor`. Records have
an `event` (start, train, val, end) and the optimizer `step`; see RunLog for their fields.
"""

from __future__ import annotations

import json
from pathlib import Path

METRICS_FILE = "metrics.jsonl"


def append_record(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as stream:
        stream.write(json.dumps(record) + "\n")


def read_records(path: Path) -> list[dict]:
    """The log's records; a line being written right now (no newline, bad JSON) is skipped."""
    records = []
    with path.open() as stream:
        for line in stream:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "step" in record:
                records.append(record)
    return records
