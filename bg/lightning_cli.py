"""The LightningCLI behind ``bg fit|validate|test|predict`` (also ``lightning ...`` and ``python -m bg``).

Defaults that differ from Lightning's: a W&B logger in offline mode writing to ``runs/`` (set
``trainer.logger.init_args.offline: false`` or ``WANDB_MODE=online`` to stream; ``wandb sync``
uploads an offline run later), no automatic flat hyper-parameter dump (the resolved config is
saved instead as ``bg_config.yaml`` in the run's own folder, which for W&B is uploaded with it).

Fault tolerance added to every ``fit``: checkpoints are written atomically (``AtomicCheckpointIO``),
SIGTERM saves ``last.ckpt`` before exiting (``PreemptionCheckpoint``), and ``--ckpt_path last`` finds
the newest ``last.ckpt`` of the same generator, molecule and model settings among the runs under the
logger's folder.
The loss schedule is the top-level ``loss`` group (``callbacks.LossStages``). Inside a W&B sweep
agent (``WANDB_SWEEP_ID`` set) the logger goes online unless ``WANDB_MODE=offline``, and joins the
agent's run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import warnings
from pathlib import Path

import lightning as L
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger

import callbacks  # noqa: F401  (short class names in configs resolve to these)
import datamodules  # noqa: F401
from bg.checkpointing import AtomicCheckpointIO, find_last_checkpoint
from bg.cli_errors import UsageError, explain_parser_error
from bg.models import BoltzmannGenerator
from bg.quiet import drop_lightning_notices
from callbacks import LossStages, PreemptionCheckpoint
from callbacks.figures import run_directory

CONFIG_NAME = "bg_config.yaml"

TRAINER_DEFAULTS = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.WandbLogger",
        "init_args": {"project": "bg", "save_dir": "runs", "offline": True},
    },
    "enable_autolog_hparams": False,
    # without a logger (--trainer.logger false) the config, figures and checkpoints go here, not into the cwd
    "default_root_dir": "runs",
}


class RunConfigSaver(SaveConfigCallback):
    """Save the resolved config as ``bg_config.yaml`` in the run's own folder (never in a folder that
    every run shares, so sweep trials and repeated runs do not collide) and hand it to the loggers."""

    def __init__(self, parser, config, config_filename: str = CONFIG_NAME, overwrite: bool = True,
                 multifile: bool = False, save_to_log_dir: bool = False):
        super().__init__(parser, config, config_filename=config_filename, overwrite=True, multifile=multifile,
                         save_to_log_dir=False)

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "predict":  # sampling has no run folder (no logger): the checkpoint holds the settings
            return
        directory = None
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                directory = Path(logger.experiment.dir)  # files/ of the W&B run: synced with it
        if directory is None:
            directory = run_directory(trainer)  # rank 0 only here: must not broadcast
        directory.mkdir(parents=True, exist_ok=True)
        self.parser.save(self.config, str(directory / self.config_filename), skip_none=False, overwrite=True)
        for logger in trainer.loggers:
            logger.log_hyperparams(self.config.as_dict())


#: Model options that concern sampling, not the trained network: with ``--ckpt_path`` LightningCLI
#: replaces the model's config by the hyperparameters stored in the checkpoint, which would silently
#: undo e.g. ``bg predict ... --model.init_args.predict_samples=50000``; these keep the config's value.
INFERENCE_OPTIONS = ("predict_samples", "sample_batch_size", "energy_backend", "energy_compile", "energy_workers",
                     "com_correction", "defensive")


class BGArgumentParser(LightningArgumentParser):
    """jsonargparse's parser, whose errors end in one ``UsageError`` line instead of the usage text and an
    exit (``bg.cli.main`` prints it). Parsers nested in another's parsing keep jsonargparse's behaviour.
    No abbreviations: ``--trainer.max_epoch`` is a typo to report, not a prefix of ``max_epochs`` to guess."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error:  # a nested parser tried inside another's parsing: jsonargparse recovers
            return super().error(message, ex)
        words = self.prog.split()
        sub = words[-1] if words and words[-1] in ("fit", "validate", "test", "predict") else None
        known = [option for action in self._actions for option in action.option_strings]
        raise UsageError(explain_parser_error(message, sub, known)) from ex


class BGCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(LossStages, "loss")

    def _parse_ckpt_path(self) -> None:
        sub = self.config.get("subcommand")
        prefix = f"{sub}.model.init_args"
        init = self.config.get(prefix) if sub else None
        keep = {k: init[k] for k in INFERENCE_OPTIONS if init is not None and k in init}
        super()._parse_ckpt_path()
        for key, value in keep.items():
            self.config[f"{prefix}.{key}"] = value

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if self.subcommand == "predict" and config.get("trainer.logger") is not False:
            # sampling logs nothing: no empty W&B run per prediction (the samples go to a folder of their own)
            config["trainer.logger"] = False
        logger = config.get("trainer.logger")
        in_sweep = bool(os.environ.get("WANDB_SWEEP_ID")) and os.environ.get("WANDB_MODE") != "offline"
        if in_sweep and getattr(logger, "class_path", "").endswith("WandbLogger") and logger.init_args.get("offline"):
            # An offline run cannot report to the sweep controller, which then never sees the metric.
            logger.init_args.offline = False
            print("W&B sweep agent detected (WANDB_SWEEP_ID): logging online to the agent's run")

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        if trainer.fast_dev_run:
            # Lightning promises no checkpoints under fast_dev_run, yet ModelCheckpoint(save_last=True) still
            # writes last.ckpt when training ends (into ./checkpoints, as no logger runs): drop them here
            trainer.callbacks = [cb for cb in trainer.callbacks if not isinstance(cb, ModelCheckpoint)]
        if not any(isinstance(cb, PreemptionCheckpoint) for cb in trainer.callbacks):
            trainer.callbacks.append(PreemptionCheckpoint())
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and logger._wandb_init.get("anonymous") is None:
                # Lightning always passes anonymous=None, and wandb warns that the setting has no effect
                logger._wandb_init.pop("anonymous", None)
        return trainer

    def before_fit(self) -> None:
        config = self.config_init[self.subcommand]
        if config.get("ckpt_path") == "last":
            config["ckpt_path"] = self._last_checkpoint()

    def _last_checkpoint(self) -> str | None:
        trainer, model = self.trainer, self.model
        if any(isinstance(cb, ModelCheckpoint) and cb.dirpath for cb in trainer.checkpoint_callbacks):
            return "last"  # a fixed checkpoint folder: Lightning finds last.ckpt there itself
        roots = [Path(lg.save_dir or trainer.default_root_dir) / str(lg.name) for lg in trainer.loggers]
        roots = roots or [Path(trainer.default_root_dir)]
        system = getattr(self.datamodule, "system", None)
        bg_class = f"{type(model).__module__}.{type(model).__qualname__}"
        found = find_last_checkpoint(roots, bg_class, getattr(system, "name", None), dict(model.hparams))
        if found is None:
            print(f"--ckpt_path last: no last.ckpt of {type(model).__name__} with these settings for this molecule under "
                  f"{', '.join(map(str, roots))}; starting from scratch", flush=True)
            return None
        print(f"--ckpt_path last: resuming {found['path']} (epoch {found['epoch']}, step {found['global_step']})",
              flush=True)
        return found["path"]

    def predict(self, model: L.LightningModule, datamodule: L.LightningDataModule | None = None,
                ckpt_path: str | None = None, **kwargs):
        """Sampling needs the trained checkpoint, not the MD data: the molecule is inside it (a transferable
        generator's comes from ``data.sequence``)."""
        if ckpt_path is None:
            raise ValueError("bg predict needs --ckpt_path (a checkpoint written by bg fit)")
        if isinstance(model, BoltzmannGenerator):
            model.build_from_checkpoint(ckpt_path)
        if hasattr(model, "bind") and datamodule is not None and hasattr(datamodule, "predict_system"):
            model.bind(datamodule.predict_system())  # a transferable generator samples the molecule data.sequence names
        with _stop_on_sigterm("bg predict"), warnings.catch_warnings():
            # predict saves no checkpoint: that the checkpoint folder moved (no logger now) does not matter
            warnings.filterwarnings("ignore", message="The dirpath has changed")
            # bg's predict loader yields sample counts, not dataset indices: there are no batch indices to infer
            warnings.filterwarnings("ignore", message="Couldn't infer the batch indices")
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


@contextlib.contextmanager
def _stop_on_sigterm(what: str):
    """Stop at SIGTERM (Lightning's own handler only takes note, which a sampling loop never reads): nothing
    of a half-drawn sample is worth keeping. Exit code 143, as for a process killed by the signal."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        print(f"{what}: SIGTERM, stopping (no samples written)", file=sys.stderr, flush=True)
        raise SystemExit(128 + signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(args: list[str] | None = None, run_subcommand: bool = True) -> BGCLI:
    """Run the LightningCLI with ``args`` (default: ``sys.argv[1:]``); with ``run_subcommand=False`` only
    parse ``args`` (no subcommand) and instantiate model, data and trainer."""
    drop_lightning_notices()
    with warnings.catch_warnings():
        # bg passes its own argv on purpose (the `--debug` flag removed, the demo's commands)
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        # Lightning's own use of a deprecated torch API: nothing a user can act on
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
        return BGCLI(BoltzmannGenerator, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                     save_config_callback=RunConfigSaver, trainer_defaults=TRAINER_DEFAULTS, args=args,
                     run=run_subcommand, parser_kwargs={"description": "bg: Boltzmann generators in PyTorch Lightning"},
                     parser_class=BGArgumentParser)
