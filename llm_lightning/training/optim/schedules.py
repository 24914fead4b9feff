"""Learning-rate schedules: the multiplier of the peak learning rate at each optimizer step.

Every schedule warms up linearly over `warmup_steps`, then:
- `cosine`: half a cosine down to `min_ratio` at `max_steps`;
- `linear`: a straight line down to `min_ratio` at `max_steps`;
- `wsd` (warmup-stable-decay): the peak until the last `decay_fraction` of the run, then down to
  `min_ratio` at `max_steps`, linearly or as 1 - sqrt(progress) (`decay_shape`). A run resumed
  from a checkpoint of its stable phase with a longer `max_steps` goes on at the peak: the way
  to extend a run without restarting it.
"""

from __future__ import annotations

import math
from functools import partial

SCHEDULES = ("cosine", "linear", "wsd")
DECAY_SHAPES = ("linear", "sqrt")


def warmup_cosine(step: int, warmup_steps: int, max_steps: int, min_ratio: float) -> float:
    """Linear up, cosine down."""
    progress = _progress(step, warmup_steps, warmup_steps, max_steps)
    if progress is None:
        return (step + 1) / warmup_steps
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_linear(step: int, warmup_steps: int, max_steps: int, min_ratio: float) -> float:
    """Linear up, linear down."""
    progress = _progress(step, warmup_steps, warmup_steps, max_steps)
    if progress is None:
        return (step + 1) / warmup_steps
    return min_ratio + (1.0 - min_ratio) * (1.0 - progress)


def warmup_stable_decay(
    step: int, warmup_steps: int, max_steps: int, min_ratio: float, decay_fraction: float, decay_shape: str
) -> float:
    """Linear up, flat at the peak, down over the last `decay_fraction` of `max_steps`."""
    decay_start = max(warmup_steps, round(max_steps * (1.0 - decay_fraction)))
    progress = _progress(step, warmup_steps, decay_start, max_steps)
    if progress is None:
        return (step + 1) / warmup_steps
    falling = progress if decay_shape == "linear" else math.sqrt(progress)
    return min_ratio + (1.0 - min_ratio) * (1.0 - falling)


def _progress(step: int, warmup_steps: int, start: int, end: int) -> float | None:
    """None during warmup; else how far `step` is from `start` to `end`, in [0, 1]."""
    if warmup_steps > 0 and step < warmup_steps:
        return None
    if end <= start:
        return 0.0
    return min(1.0, max(0.0, (step - start) / (end - start)))


def schedule(
    name: str,
    warmup_steps: int,
    max_steps: int,
    min_ratio: float,
    decay_fraction: float = 0.2,
    decay_shape: str = "linear",
):
    """The multiplier function LambdaLR takes, by name."""
    if name == "cosine":
        return partial(warmup_cosine, warmup_steps=warmup_steps, max_steps=max_steps, min_ratio=min_ratio)
    if name == "linear":
        return partial(warmup_linear, warmup_steps=warmup_steps, max_steps=max_steps, min_ratio=min_ratio)
    return partial(
        warmup_stable_decay,
        warmup_steps=warmup_steps,
        max_steps=max_steps,
        min_ratio=min_ratio,
        decay_fraction=decay_fraction,
        decay_shape=decay_shape,
    )
