"""Log-likelihoods of continuations, computed as lm-evaluation-harness's `hf` model does.

A (context, continuation) pair is tokenised the harness's way (`encode_pair`: trailing spaces
of the context move to the continuation, the whole text is encoded and split after the
context's tokens), and scored over the last `max_length` tokens of context + continuation, the
last one dropped (the harness's left truncation). Rows are right-padded: with causal attention
the padding never changes a real position's logits. Log-softmax runs in fp32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Pair = tuple[list[int], list[int]]  # (context ids, continuation ids)


def encode_pair(tokenizer, context: str, continuation: str) -> Pair:
    """Context and continuation ids; an empty context becomes the end-of-text token."""
    if not context:
        return [tokenizer.eos_id], tokenizer.encode(continuation)
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    return context_ids, whole[len(context_ids) :]


def model_input(pair: Pair, max_length: int) -> tuple[list[int], int]:
    """(input ids, continuation length) of a pair: the last max_length + 1 tokens, minus the last."""
    context, continuation = pair
    ids = (context + continuation)[-(max_length + 1) :][:-1]
    return ids, len(continuation)


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    """The model's logits; a tensor-parallel head's DTensor output gathered whole."""
    logits = model(ids)
    return logits.full_tensor() if hasattr(logits, "full_tensor") else logits


@torch.no_grad()
def score_pairs(
    model, pairs: Sequence[Pair], max_length: int, batch_size: int = 16
) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), whether greedy decoding gives the continuation)."""
    device = next(model.parameters()).device
    results = []
    for start in range(0, len(pairs), batch_size):
        rows = [model_input(pair, max_length) for pair in pairs[start : start + batch_size]]
        width = max(len(ids) for ids, _ in rows)
        batch = torch.zeros(len(rows), width, dtype=torch.long)
        for i, (ids, _) in enumerate(rows):
            batch[i, : len(ids)] = torch.tensor(ids)
        logits = logits_of(model, batch.to(device)).float()
        for i, ((ids, count), (_, continuation)) in enumerate(zip(rows, pairs[start:], strict=False)):
            results.append(_continuation_score(logits[i, len(ids) - count : len(ids)], continuation))
    return results


def _continuation_score(logits: torch.Tensor, continuation: list[int]) -> tuple[float, bool]:
    target = torch.tensor(continuation, device=logits.device)
    logprobs = logits.log_softmax(dim=-1)
    total = logprobs.gather(1, target[:, None]).sum()
    return float(total), bool((logprobs.argmax(dim=-1) == target).all())
