"""Save a checkpoint when the job is preempted (SIGTERM), so that ``--ckpt_path last`` resumes it.

Clusters and cloud schedulers send SIGTERM some seconds before they kill a job. This callback
replaces Lightning's SIGTERM handler during training with one that only sets a flag (no I/O, no
collectives inside a signal handler). After every training batch the ranks combine their flags
with one all-reduce (max) at the same point of the loop, so a signal that reached any rank, e.g.
only rank 0 as with ``strategy=ddp``, stops every rank after the same step: each writes
``last.ckpt`` into the run's checkpoint folder (rank 0 writes, atomically, the others wait) and
the run exits with Lightning's ``SIGTERMException``. Lightning's own handler broadcasts from inside
the signal handler, which can meet a rank already in the next step's collective and hang
(Lightning-AI/pytorch-lightning#20806; we saw it here in about one run of three).
The ``bg`` CLI adds this callback to every ``fit`` unless the config has one.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from callbacks.figures import run_directory

log = logging.getLogger(__name__)


class PreemptionCheckpoint(Callback):
    """On SIGTERM during ``fit``: finish the current batch on every rank, save
    ``<checkpoint dir>/<filename>``, exit.

    Args:
        filename: checkpoint file name; ``last.ckpt`` is what ``--ckpt_path last`` looks for.
    """

    def __init__(self, filename: str = "last.ckpt"):
        super().__init__()
        self.filename = filename
        self.saved_path: Path | None = None
        self._requested = False
        self._previous_handler: Any = None

    @staticmethod
    def checkpoint_dir(trainer: L.Trainer) -> Path:
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.dirpath:
                return Path(cb.dirpath)
        return run_directory(trainer) / "checkpoints"

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self._requested = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._requested = False
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_handler()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_handler()

    def _restore_handler(self) -> None:
        if self._previous_handler is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        requested = self._requested
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            flag = torch.tensor([float(requested)], device=pl_module.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            requested = bool(flag.item())
        if not requested:
            return
        path = self.checkpoint_dir(trainer) / self.filename
        trainer.save_checkpoint(path)  # every rank calls it (it has a barrier); rank 0 writes
        self.saved_path = path
        if trainer.is_global_zero:
            log.warning("SIGTERM: saved %s at step %d; resume with --ckpt_path last (or this path)",
                        path, trainer.global_step)
            print(f"preempted (SIGTERM): checkpoint {path} at step {trainer.global_step}", flush=True)
        raise SIGTERMException()
