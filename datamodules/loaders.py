"""A training DataLoader that resumes mid-epoch at the batch where a checkpoint was taken.

The order of the batches is a function of (seed, epoch, rank) only: the loader always uses a
``DistributedSampler`` (one replica when not distributed, so Lightning leaves it in place), and sets
its epoch from the trainer whenever an iterator is created, including the first one after a resume,
which Lightning creates before it sets the sampler epoch itself. ``position()`` tells it the epoch and how
many of that epoch's batches the restored run has already trained on; those are skipped.
"""

from __future__ import annotations

import os
from typing import Callable

import lightning as L
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler


def distributed_sampler(dataset: Dataset, shuffle: bool, drop_last: bool = False) -> DistributedSampler:
    """A ``DistributedSampler`` for this process (world size 1 outside DDP), seeded by ``seed_everything``."""
    initialized = dist.is_available() and dist.is_initialized()
    world, rank = (dist.get_world_size(), dist.get_rank()) if initialized else (1, 0)
    seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
    return DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)


class ResumableLoader(DataLoader):
    """``DataLoader`` whose iterators start at ``position()`` = (epoch, batches already trained).

    Args:
        position: called when an iterator is created; returns the trainer's current epoch and the number
            of batches of it to skip (0 except for the first epoch after a mid-epoch resume), or None
            outside training.
        *args, **kwargs: those of ``DataLoader``; ``sampler`` must be a ``DistributedSampler``.
    """

    def __init__(self, *args, position: Callable[[], tuple[int, int] | None] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.sampler, DistributedSampler):
            raise TypeError("ResumableLoader needs a DistributedSampler (see distributed_sampler())")
        self.position = position

    # Lightning checks for these to call a loader resumable; the position itself is restored through
    # the DataModule's state (it reads the trainer's batch progress), so the loader keeps none.
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        pass

    def __iter__(self):
        where = self.position() if self.position is not None else None
        skip = 0
        if where is not None:
            epoch, skip = where
            self.sampler.set_epoch(epoch)
        iterator = super().__iter__()
        if 0 < skip < len(self):
            for _ in range(skip):
                next(iterator)
        return iterator


class ResumableDataModule(L.LightningDataModule):
    """A DataModule whose training position (epoch, batches of it trained) is kept in checkpoints by Lightning;
    ``_train_position`` is what ``ResumableLoader(position=...)`` asks (see the module docstring)."""

    _resume: tuple[int, int] | None = None

    def _fitting(self) -> bool:
        return self.trainer is not None and self.trainer.state.fn == "fit"

    def state_dict(self) -> dict[str, int]:
        """The data position (epoch, batches of it trained), stored in checkpoints by Lightning."""
        if not self._fitting():
            return {}
        return {"epoch": self.trainer.current_epoch,
                "batches": int(self.trainer.fit_loop.epoch_loop.batch_progress.current.ready)}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        if state_dict:
            self._resume = (int(state_dict["epoch"]), int(state_dict["batches"]))

    def _train_position(self) -> tuple[int, int] | None:
        if not self._fitting():
            return None
        epoch, skip = self.trainer.current_epoch, 0
        if self._resume is not None and self._resume[0] == epoch:
            skip = self._resume[1]
        self._resume = None
        return epoch, skip
