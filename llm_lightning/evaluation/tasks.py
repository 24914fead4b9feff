"""Local multiple-choice tasks: one JSON object per line, `{"context": str, "choices": [str, ...],
"gold": int}`, scored as lm-evaluation-harness scores `multiple_choice` tasks.

Each choice is scored as the continuation " " + choice (the harness's target delimiter) of the
context; `acc` counts the examples whose gold choice has the highest log-likelihood, `acc_norm`
those whose gold choice has the highest log-likelihood per character of the choice (the
harness's length normalisation). Counts, not means, so ranks' shares add up exactly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from llm_lightning.errors import UserError
from llm_lightning.evaluation.scoring import encode_pair, score_pairs

DELIMITER = " "


@dataclass(frozen=True)
class Example:
    context: str
    choices: tuple[str, ...]
    gold: int


@dataclass(frozen=True)
class Task:
    name: str  # the file's stem: metrics are eval/<name>/acc and eval/<name>/acc_norm
    examples: tuple[Example, ...]


def read_task(path: str | Path, flag: str = "--eval.tasks") -> Task:
    """A task file; UserError naming the file and line for anything malformed."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{flag} {path}: no such file (a .jsonl of context, choices, gold)")
    examples = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            examples.append(_example(line, f"{flag} {path}, line {number}"))
    if not examples:
        raise UserError(f"{flag} {path}: no examples in the file")
    return Task(path.stem, tuple(examples))


def _example(line: str, where: str) -> Example:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise UserError(f"{where}: not JSON ({error.msg}); one object per line") from None
    if not isinstance(record, dict):
        raise UserError(f"{where}: not a JSON object with context, choices and gold")
    context, choices, gold = record.get("context"), record.get("choices"), record.get("gold")
    if not isinstance(context, str):
        raise UserError(f'{where}: "context" must be a string')
    if (
        not isinstance(choices, list)
        or len(choices) < 2
        or not all(isinstance(c, str) and c for c in choices)
    ):
        raise UserError(f'{where}: "choices" must be a list of at least two non-empty strings')
    if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(choices):
        raise UserError(f'{where}: "gold" must be the index of the right choice (0..{len(choices) - 1})')
    return Example(context, tuple(choices), gold)


def example_pairs(tokenizer, example: Example) -> list[tuple[list[int], list[int]]]:
    return [encode_pair(tokenizer, example.context, DELIMITER + choice) for choice in example.choices]


def grade(example: Example, loglikelihoods: list[float]) -> tuple[int, int]:
    """(acc, acc_norm) of one example, each 0 or 1."""
    normalised = [ll / len(choice) for ll, choice in zip(loglikelihoods, example.choices, strict=True)]
    best = max(range(len(loglikelihoods)), key=loglikelihoods.__getitem__)
    best_norm = max(range(len(normalised)), key=normalised.__getitem__)
    return int(best == example.gold), int(best_norm == example.gold)


def count_correct(model, tokenizer, examples, max_length: int, batch_size: int = 16) -> tuple[int, int, int]:
    """(acc count, acc_norm count, examples) over `examples`; the choices of several examples
    share a forward pass (`batch_size` sequences), since small batches are overhead-bound."""
    pairs = [example_pairs(tokenizer, example) for example in examples]
    scores = score_pairs(model, [pair for group in pairs for pair in group], max_length, batch_size)
    acc = acc_norm = start = 0
    for example in examples:
        lls = [ll for ll, _ in scores[start : start + len(example.choices)]]
        start += len(example.choices)
        right, right_norm = grade(example, lls)
        acc, acc_norm = acc + right, acc_norm + right_norm
    return acc, acc_norm, len(examples)
