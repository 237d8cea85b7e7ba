"""Mixed precision that is real on every device.

On CUDA, accelerate provides autocast and a loss scaler. On CPU it creates no scaler and its fp16 autocast leaves
activations in fp32, so fp16 there would silently be fp32 training. This module supplies torch's own autocast and
`torch.amp.GradScaler` wherever accelerate does not, behind one small interface the loop uses in every case.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class StepOutcome:
    stepped: bool
    overflow: bool  # the fp16 loss scaler found inf/NaN gradients and skipped (its scale was halved)


class MixedPrecision:
    def __init__(self, accelerator, mode: str):
        self.accelerator = accelerator
        self.mode = mode
        self.device_type = accelerator.device.type
        self.uses_accelerate = accelerator.native_amp and mode != "no"
        # Our scaler only where accelerate provides none.
        self.scaler = (
            torch.amp.GradScaler(self.device_type)
            if mode == "fp16" and accelerator.scaler is None
            else None
        )

    def autocast(self):
        if self.mode == "no":
            return contextlib.nullcontext()
        if self.uses_accelerate:
            return self.accelerator.autocast()
        return torch.autocast(device_type=self.device_type, dtype=AUTOCAST_DTYPES[self.mode])

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(self.scaler.scale(loss) if self.scaler is not None else loss)

    def unscale_and_clip(self, optimizer, parameters, max_norm: float) -> torch.Tensor:
        """True gradient norm (after unscaling); clipping happens only if max_norm > 0."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        if max_norm > 0:
            return self.accelerator.clip_grad_norm_(parameters, max_norm)
        return torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])

    def step(self, optimizer) -> StepOutcome:
        if self.scaler is not None:
            scale_before = self.scaler.get_scale()
            self.scaler.step(optimizer)
            self.scaler.update()
            overflow = self.scaler.get_scale() < scale_before
            return StepOutcome(stepped=not overflow, overflow=overflow)
        optimizer.step()
        skipped = bool(self.accelerator.optimizer_step_was_skipped)
        return StepOutcome(stepped=not skipped, overflow=skipped)

    def scaler_state(self) -> dict | None:
        scaler = self.scaler or self.accelerator.scaler
        return scaler.state_dict() if scaler is not None else None

    def load_scaler_state(self, state: dict | None) -> None:
        scaler = self.scaler or self.accelerator.scaler
        if scaler is not None and state:
            scaler.load_state_dict(state)
