"""Save a checkpoint when the job is preempted (SIGTERM), so that ``--ckpt_path last`` resumes it.

Clusters and cloud schedulers send SIGTERM some seconds before they kill a job. Lightning turns the
signal into a clean stop at the end of the current training batch (on every DDP rank at the same
step) and calls ``on_exception``; this callback then writes ``last.ckpt`` into the checkpoint
folder of the run (the first ``ModelCheckpoint``'s, else ``<run>/checkpoints``) and the process exits.
The ``bg`` CLI adds it to every ``fit`` unless the config has one.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from callbacks.figures import run_directory

log = logging.getLogger(__name__)


class PreemptionCheckpoint(Callback):
    """On SIGTERM during ``fit``, save ``<checkpoint dir>/<filename>`` (atomically) before exiting.

    Args:
        filename: checkpoint file name; ``last.ckpt`` is what ``--ckpt_path last`` looks for.
    """

    def __init__(self, filename: str = "last.ckpt"):
        super().__init__()
        self.filename = filename
        self.saved_path: Path | None = None

    @staticmethod
    def checkpoint_dir(trainer: L.Trainer) -> Path:
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.dirpath:
                return Path(cb.dirpath)
        return run_directory(trainer) / "checkpoints"

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != "fit":
            return
        path = self.checkpoint_dir(trainer) / self.filename
        # Every rank calls it (it has a barrier); rank 0 writes, through Lightning's atomic save.
        trainer.save_checkpoint(path)
        self.saved_path = path
        if trainer.is_global_zero:
            log.warning("SIGTERM: saved %s at step %d; resume with --ckpt_path last (or this path)",
                        path, trainer.global_step)
            print(f"preempted (SIGTERM): checkpoint {path} at step {trainer.global_step}", flush=True)
