"""A loss term of one micro-batch as the objective combines it: its value, how it is normalised, how it is weighted.

Per-token terms are sums over positions, divided by the valid-position count of the whole optimizer step
(`PositionSelection.counts`, summed over micro-batches and processes); batch-statistic terms are one value per
micro-batch, averaged over micro-batches.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

PER_TOKEN = "per-token"
PER_BATCH = "per-batch"


@dataclass
class Term:
    value: Tensor  # a sum over positions (PER_TOKEN) or a micro-batch value (PER_BATCH)
    kind: str
    count_key: str | None = None  # which position count normalises it (a key of `PositionSelection.counts`)
    weight_key: str | None = None  # which schedule weight multiplies it (None: none)
    scale: float = 1.0  # a constant factor on top of it (the LM weight, a KD balance)
