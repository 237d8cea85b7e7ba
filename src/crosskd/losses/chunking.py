"""Helpers shared by the losses that work over positions in bounded-size chunks.

Logits over a vocabulary of 151,936 ids for a thousand positions are 600 MB in float32; every loss here
therefore walks the positions in chunks and keeps at most one chunk of vocabulary-wide rows alive.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from crosskd.config import ObjectiveConfig

#: Positions per chunk, the run's default `objective.chunk_size`: 256 rows x 151,936 ids x 4 bytes is 156 MB per
#: vocabulary-wide float32 buffer.
DEFAULT_CHUNK_ROWS = ObjectiveConfig.chunk_size

#: Bytes of float32 log-probability chunks the fused LM + KD loss keeps for the backward by default
#: (`objective.kept_logits_mib`).
DEFAULT_KEPT_LOGIT_BYTES = ObjectiveConfig.kept_logits_mib * 2**20


def chunk_slices(n_rows: int, chunk_size: int) -> Iterator[slice]:
    """Consecutive slices of at most ``chunk_size`` rows covering ``range(n_rows)``."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    for start in range(0, n_rows, chunk_size):
        yield slice(start, min(start + chunk_size, n_rows))


def upcast(x: Tensor) -> Tensor:
    """``x`` in float32, or wider if it already is.

    exp/log/softmax in bf16 or fp16 lose the tail of the distribution; float64 is kept as is so that
    ``torch.autograd.gradcheck`` sees float64 all the way through.
    """
    return x.to(torch.promote_types(x.dtype, torch.float32))
