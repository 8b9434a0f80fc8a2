"""The LightningCLI behind ``bg fit|validate|test|predict`` (also ``lightning ...`` and ``python -m bg``).

Defaults that differ from Lightning's: a W&B logger in offline mode writing to ``runs/`` (set
``trainer.logger.init_args.offline: false`` or ``WANDB_MODE=online`` to stream; ``wandb sync``
uploads an offline run later), no automatic flat hyper-parameter dump (the resolved config is
saved instead as ``bg_config.yaml`` in the run's own folder, which for W&B is uploaded with it).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger

import callbacks  # noqa: F401  (short class names in configs resolve to these)
import datamodules  # noqa: F401
from bg.models import BoltzmannGenerator

CONFIG_NAME = "bg_config.yaml"

TRAINER_DEFAULTS = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.WandbLogger",
        "init_args": {"project": "bg", "save_dir": "runs", "offline": True},
    },
    "enable_autolog_hparams": False,
}


def run_directory(trainer: L.Trainer) -> Path | None:
    """The folder of this run's logs: the W&B run folder, or the logger's log_dir."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            return Path(logger.experiment.dir).parent
    return Path(trainer.log_dir) if trainer.log_dir else None


class RunConfigSaver(SaveConfigCallback):
    """Save the resolved config as ``bg_config.yaml`` in the run's own folder (never in a folder that
    every run shares, so sweep trials and repeated runs do not collide) and hand it to the loggers."""

    def __init__(self, parser, config, config_filename: str = CONFIG_NAME, overwrite: bool = True,
                 multifile: bool = False, save_to_log_dir: bool = False):
        super().__init__(parser, config, config_filename=config_filename, overwrite=True, multifile=multifile,
                         save_to_log_dir=False)

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        directory = None
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                directory = Path(logger.experiment.dir)  # files/ of the W&B run: synced with it
        if directory is None:
            directory = Path(trainer.log_dir or trainer.default_root_dir)
        directory.mkdir(parents=True, exist_ok=True)
        self.parser.save(self.config, str(directory / self.config_filename), skip_none=False, overwrite=True)
        for logger in trainer.loggers:
            logger.log_hyperparams(self.config.as_dict())


class BGCLI(LightningCLI):
    def predict(self, model: L.LightningModule, datamodule: L.LightningDataModule | None = None,
                ckpt_path: str | None = None, **kwargs):
        """Sampling needs the trained checkpoint, not the MD data: the molecule is inside it."""
        if ckpt_path is None:
            raise ValueError("bg predict needs --ckpt_path (a checkpoint written by bg fit)")
        if isinstance(model, BoltzmannGenerator):
            model.build_from_checkpoint(ckpt_path)
        return self.trainer.predict(model, ckpt_path=ckpt_path, **kwargs)

    def after_fit(self) -> None:
        trainer = self.trainer
        if not trainer.is_global_zero:
            return
        shown = ("val/ess", "val/nll", "val/torsion_w2", "val/torsion_w2_reweighted", "val/distance_distortion")
        summary = [f"{k} {float(trainer.callback_metrics[k]):.4g}" for k in shown if k in trainer.callback_metrics]
        if summary:
            print("final evaluation: " + ", ".join(summary))
        for ckpt in trainer.checkpoint_callbacks:
            if getattr(ckpt, "last_model_path", ""):
                print(f"last checkpoint: {ckpt.last_model_path}")
            if getattr(ckpt, "best_model_path", "") and ckpt.monitor:
                print(f"best checkpoint by {ckpt.monitor} ({float(ckpt.best_model_score):.4g}): {ckpt.best_model_path}")
            elif getattr(ckpt, "best_model_path", ""):
                print(f"checkpoint: {ckpt.best_model_path}")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                run_dir = Path(logger.experiment.dir).parent
                if logger.experiment.settings.mode == "offline" or "offline" in run_dir.name:
                    print(f"W&B offline run: {run_dir}\n  upload it with: wandb sync {run_dir}")
                else:
                    print(f"W&B run: {logger.experiment.url}")


def run(args: list[str] | None = None) -> BGCLI:
    """Run the LightningCLI with ``args`` (default: ``sys.argv[1:]``)."""
    return BGCLI(BoltzmannGenerator, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                 save_config_callback=RunConfigSaver, trainer_defaults=TRAINER_DEFAULTS, args=args,
                 parser_kwargs={"description": "bg: Boltzmann generators in PyTorch Lightning"})
