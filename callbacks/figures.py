"""Hand figures and histograms to whatever logger is attached (W&B, TensorBoard, CSV, none).

W&B: ``log_image`` / ``wandb.Histogram`` at the global step. TensorBoard: ``add_figure`` /
``add_histogram``. Any other logger (CSV): PNG files in ``<log_dir>/figures/``. Only rank 0 logs.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.loggers.logger import DummyLogger

from bg import plots


def run_directory(trainer: L.Trainer) -> Path:
    """This run's log folder: the W&B run folder, else the first logger's ``log_dir`` (or save_dir), else
    ``default_root_dir``. Unlike ``trainer.log_dir`` it does not broadcast, so one rank alone may call it
    (calling ``trainer.log_dir`` on rank 0 only leaves the other ranks' next collective mismatched)."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            return Path(logger.experiment.dir).parent
    if trainer.loggers and not isinstance(trainer.loggers[0], DummyLogger):
        directory = getattr(trainer.loggers[0], "log_dir", None) or trainer.loggers[0].save_dir
        if directory:
            return Path(directory)
    return Path(trainer.default_root_dir)


def _figure_dir(trainer: L.Trainer) -> Path:
    path = run_directory(trainer) / "figures"
    path.mkdir(parents=True, exist_ok=True)
    return path


def log_figure(trainer: L.Trainer, key: str, fig) -> None:
    """Log a matplotlib figure under ``key`` (and close it)."""
    try:
        if not trainer.is_global_zero or trainer.fast_dev_run:  # fast_dev_run: no logging, no files
            return
        step = trainer.global_step
        handled = False
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                import wandb

                logger.experiment.log({key: wandb.Image(fig), "trainer/global_step": step})
                handled = True
            elif isinstance(logger, TensorBoardLogger):
                logger.experiment.add_figure(key, fig, global_step=step, close=False)
                handled = True
        if not handled:
            fig.savefig(_figure_dir(trainer) / f"{key.replace('/', '_')}_step{step:07d}.png", dpi=100)
    finally:
        plots.close(fig)


def log_histogram(trainer: L.Trainer, key: str, values: np.ndarray) -> None:
    """Log a histogram of ``values`` where the logger supports it (W&B, TensorBoard)."""
    if not trainer.is_global_zero or trainer.fast_dev_run:
        return
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            import wandb

            logger.experiment.log({key: wandb.Histogram(values), "trainer/global_step": trainer.global_step})
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_histogram(key, values, global_step=trainer.global_step)
