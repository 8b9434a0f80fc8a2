"""``predict`` for generators: how many samples each batch draws, and what a batch returns."""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from bg.sampling import Energy, Proposal, Sampler


class SampleCounts(Dataset):
    """Batches for ``predict``: item i is the number of samples to draw in batch i."""

    def __init__(self, n: int, batch_size: int):
        self.sizes = [min(batch_size, n - i) for i in range(0, n, batch_size)]

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> int:
        return self.sizes[i]


def predict_loader(n_samples: int, world_size: int, batch_size: int, whole: bool) -> DataLoader:
    """Every rank draws ⌈n_samples / world_size⌉ samples, in batches of ``batch_size``, or in one batch
    when ``whole`` (a sampler that weighs its samples together, e.g. SMC's population)."""
    per_rank = math.ceil(n_samples / world_size)
    # each rank gets its own sampler slice of the dataset
    return DataLoader(SampleCounts(per_rank * world_size, per_rank if whole else batch_size), batch_size=None)


def predict_batch(proposal: Proposal, target: Energy, n: int, sampler: Sampler | None) -> dict[str, Any]:
    """``n`` samples: importance-weighted proposal samples (``sampler`` None), else the sampler's output;
    tensors on the CPU."""
    out = proposal.weigh(n, target) if sampler is None else sampler(proposal, target, n, progress=True)
    return {k: v.cpu() if isinstance(v, Tensor) else v for k, v in out.items()}


__all__ = ["SampleCounts", "predict_batch", "predict_loader"]
