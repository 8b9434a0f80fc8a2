"""Training steps whose loss or gradients are not finite are skipped, counted, and limited in a row."""

from __future__ import annotations

import logging
import math
from typing import Callable, Iterable

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)


class NonFiniteStepGuard:
    """Skip optimizer steps with a non-finite loss or gradients (see ``BoltzmannGenerator``).

    A non-finite loss is replaced by NaN gradients on every parameter (:meth:`nan_loss`): under DDP the
    gradient all-reduce carries them to every rank, so all ranks skip the step together without an
    extra collective. ``max_in_a_row`` skipped steps in a row raise: the weights or the data are then
    broken rather than unlucky.
    """

    def __init__(self, max_in_a_row: int = 20):
        if max_in_a_row < 1:
            raise ValueError(f"model.max_skipped_in_a_row must be ≥ 1, got {max_in_a_row}")
        self.max_in_a_row = max_in_a_row
        self.skipped = 0  # in checkpoints (bg_skipped_steps)
        self.in_a_row = 0
        self.loss_nonfinite = False

    def check_loss(self, loss: Tensor, terms: dict[str, Tensor], rank: int, step: int) -> bool:
        """Whether the loss is finite (a warning names the terms when it is not)."""
        self.loss_nonfinite = not bool(torch.isfinite(loss))
        if self.loss_nonfinite:
            log.warning("rank %d, step %d: non-finite training loss (%s); the step is skipped", rank, step,
                        ", ".join(f"{k}={v.item():.4g}" for k, v in terms.items()))
        return not self.loss_nonfinite

    @staticmethod
    def nan_loss(parameters: Iterable[nn.Parameter]) -> Tensor:
        """A loss whose gradients are NaN on every trainable parameter."""
        return sum((p * math.nan).sum() for p in parameters if p.requires_grad)

    def step(self, optimizer: torch.optim.Optimizer, closure: Callable[[], object],
             parameters: Iterable[nn.Parameter], rank: int, global_step: int) -> None:
        """Run ``closure`` (forward/backward), then step ``optimizer`` only if the loss and all gradients
        are finite (one device sync per step, not one per parameter)."""
        closure()
        grads = [p.grad for p in parameters if p.grad is not None]
        finite = not self.loss_nonfinite and bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
        if finite:
            self.in_a_row = 0
            optimizer.step()  # gradient clipping and on_before_optimizer_step run inside, as usual
            return
        self.skipped += 1
        self.in_a_row += 1
        optimizer.zero_grad(set_to_none=True)
        if not self.loss_nonfinite:
            log.warning("rank %d, step %d: non-finite gradients; the step is skipped", rank, global_step)
        if self.in_a_row >= self.max_in_a_row:
            raise FloatingPointError(
                f"{self.in_a_row} training steps in a row had a non-finite loss or gradients (last at step "
                f"{global_step}); the run is stopped. Lower the learning rate, the energy_cut or the loss weights "
                "of the energy terms, or resume from an earlier checkpoint.")
