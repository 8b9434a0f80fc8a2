"""Loss stages: which loss terms train the generator, with which weights, when.

Kim et al. (2024) train in stages: maximum likelihood, then ML + a 2-Wasserstein loss on backbone
distance matrices, then the energy-based reverse KL, because ML or KL alone were unstable for
proteins. This callback sets ``pl_module.loss_weights`` (and optionally the learning rate) from a
list of stages in the config; the module only computes the terms.

A stage ends after ``epochs`` epochs or ``steps`` optimizer steps (counted from its start), or when
the metric ``monitor`` has not improved for ``patience`` validation runs (``mode`` min/max); a
stage may combine a length with a monitor (whichever comes first). The last stage runs until
training stops, or, if it has a length, stops the training when it ends (``trainer.max_epochs``
then only bounds the total). The current stage is part of checkpoints, so a resumed run continues in it, and is
logged as ``train/stage`` every step.

The CLI always has one ``LossStages``, configured under the top-level key ``loss`` (stages keyed by
name, in order), so that every setting has a flat name that sweeps and command lines can set, e.g.
``--loss.stages.ml.epochs=30`` or ``--loss.stages.kl_ml.lr=1e-4``. A term's weight is one number
across stages through ``weight_scale`` (``--loss.weight_scale.w2=10`` multiplies the W2 weight of every
stage by 10), which is how a sweep varies "the W2 weight"::

    loss:
      stages:
        ml: {weights: {nll: 1.0}, epochs: 20}
        ml_w2: {weights: {nll: 1.0, w2: 100.0}, epochs: 10}
        ml_w2_kl: {weights: {nll: 1.0, w2: 100.0, kl: 0.1}, epochs: 10, lr: 3.0e-4}
        kl_ml: {weights: {kl: 1.0, nll: 0.1}, lr: 1.0e-4, lr_end: 1.0e-5}

Without ``loss.stages`` the callback does nothing and ``model.loss_weights`` apply throughout.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback


@dataclass
class Stage:
    """One training stage.

    Attributes:
        weights: loss term → weight; terms not listed have weight 0.
        name: label in logs (set from the key when stages are given as a dict).
        epochs, steps: length of the stage (None: no length limit).
        monitor: metric name (e.g. ``val/nll``) ending the stage when it stops improving.
        patience: validation runs without improvement before the stage ends.
        mode: ``"min"`` or ``"max"`` for ``monitor``.
        min_delta: improvement smaller than this does not count.
        lr: learning rate from the start of the stage (None: keep the current one).
        lr_end: cosine-decay the learning rate from ``lr`` to ``lr_end`` over the stage (needs a
            length in epochs or steps).
    """

    weights: dict[str, float]
    name: str = ""
    epochs: int | None = None
    steps: int | None = None
    monitor: str | None = None
    patience: int = 3
    mode: str = "min"
    min_delta: float = 0.0
    lr: float | None = None
    lr_end: float | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("min", "max"):
            raise ValueError(f"stage {self.name!r}: mode must be 'min' or 'max', got {self.mode!r}")
        if self.lr_end is not None and (self.lr is None or (self.epochs is None and self.steps is None)):
            raise ValueError(f"stage {self.name!r}: lr_end needs lr and a length (epochs or steps)")
        for key, w in self.weights.items():
            if w < 0:
                raise ValueError(f"stage {self.name!r}: weight of {key} is negative ({w})")


@dataclass
class _Progress:
    index: int = 0
    start_epoch: int = 0
    start_step: int = 0
    best: float | None = None
    bad_checks: int = 0
    history: list[dict] = field(default_factory=list)


class LossStages(Callback):
    """Switch loss weights through stages (see module docstring).

    Args:
        stages: name → stage (a :class:`Stage` or a dict of its fields), in training order; from
            Python also a list of stage dicts with ``name``. None: no stages (the callback is inert).
        weight_scale: term → factor applied to that term's weight in every stage.
    """

    def __init__(self, stages: dict[str, Stage] | None = None, weight_scale: dict[str, float] | None = None):
        super().__init__()
        self.weight_scale = dict(weight_scale or {})
        for term, factor in self.weight_scale.items():
            if factor < 0:
                raise ValueError(f"loss.weight_scale.{term} must be ≥ 0, got {factor}")
        self.stages: list[Stage] = []
        if stages is None:
            pass
        elif isinstance(stages, dict):
            for name, spec in stages.items():
                spec = spec if isinstance(spec, Stage) else Stage(**spec)
                self.stages.append(replace(spec, name=name))
        else:
            self.stages = [s if isinstance(s, Stage) else Stage(**s) for s in stages]
        if stages is not None and not self.stages:
            raise ValueError("LossStages needs at least one stage (or stages: null for none)")
        for s in self.stages:
            if not s.name:
                raise ValueError(f"every stage needs a name; got {s}")
        unused = sorted(set(self.weight_scale) - {t for s in self.stages for t in s.weights})
        if unused:
            raise ValueError(f"loss.weight_scale names {', '.join(unused)}, which no stage uses")
        for s in self.stages:
            s.weights = {t: w * self.weight_scale.get(t, 1.0) for t, w in s.weights.items()}
        self.progress = _Progress()

    @property
    def active(self) -> bool:
        return bool(self.stages)

    # ------------------------------------------------------------------ state
    @property
    def stage(self) -> Stage:
        return self.stages[self.progress.index]

    def state_dict(self) -> dict[str, Any]:
        if not self.active:
            return {}
        return dict(asdict(self.progress), stage_names=[s.name for s in self.stages])

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict and not self.active:
            return
        if not self.active:
            raise ValueError(f"the checkpoint was trained with loss stages {state_dict.get('stage_names')}; "
                             "resume with the same loss.stages")
        state = dict(state_dict)
        names = state.pop("stage_names", None)
        current = [s.name for s in self.stages]
        # stages appended after the checkpoint's (a finished run extended by a new stage) are fine: the run goes
        # on into them once its last stage is over
        if names is not None and names != current[: len(names)]:
            raise ValueError(f"the checkpoint was trained with stages {names}, the config has "
                             f"{current}; resume with the same stages (new stages may only be appended)")
        self.progress = _Progress(**state)

    # ------------------------------------------------------------------ transitions
    def _apply(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        check = getattr(pl_module, "check_loss_weights", None)
        if check is not None:
            check(self.stage.weights)
        pl_module.loss_weights = dict(self.stage.weights)

    def _enter(self, index: int, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        p = self.progress
        p.history.append(dict(stage=self.stage.name, start_step=p.start_step, end_step=trainer.global_step,
                              end_epoch=trainer.current_epoch))
        self.progress = _Progress(index=index, start_epoch=trainer.current_epoch, start_step=trainer.global_step,
                                  history=p.history)
        self._apply(trainer, pl_module)
        if self.stage.lr is not None:
            self._set_lr(trainer, self.stage.lr)

    def _advance_if_done(self, trainer: L.Trainer, pl_module: L.LightningModule, force: bool = False) -> None:
        """Enter the next stage when this one is over (the last stage never advances: see ``_stop_if_finished``)."""
        p, s = self.progress, self.stage
        if p.index == len(self.stages) - 1:
            return
        done = force
        if s.epochs is not None and trainer.current_epoch - p.start_epoch >= s.epochs:
            done = True
        if s.steps is not None and trainer.global_step - p.start_step >= s.steps:
            done = True
        if done:
            self._enter(p.index + 1, trainer, pl_module)
            self._stop_if_finished(trainer, epochs_done=0)  # a last stage of length 0

    def _stop_if_finished(self, trainer: L.Trainer, epochs_done: int) -> None:
        """A length on the last stage ends the training (so sweeps may vary stage lengths freely)."""
        p, s = self.progress, self.stage
        if p.index != len(self.stages) - 1 or trainer.should_stop:
            return
        if (s.epochs is not None and epochs_done >= s.epochs) or (
                s.steps is not None and trainer.global_step - p.start_step >= s.steps):
            print(f"loss stage {s.name!r} finished at epoch {trainer.current_epoch}, step {trainer.global_step}: "
                  "end of the last stage, training stops", flush=True)
            trainer.should_stop = True

    @staticmethod
    def _set_lr(trainer: L.Trainer, lr: float) -> None:
        for opt in trainer.optimizers:
            for group in opt.param_groups:
                group["lr"] = lr

    def _stage_length_steps(self, trainer: L.Trainer) -> float | None:
        s = self.stage
        lengths = []
        if s.steps is not None:
            lengths.append(s.steps)
        if s.epochs is not None and trainer.num_training_batches not in (None, math.inf):
            per_epoch = max(1, int(trainer.num_training_batches) // max(1, trainer.accumulate_grad_batches))
            lengths.append(s.epochs * per_epoch)
        return min(lengths) if lengths else None

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.active:
            return
        self._apply(trainer, pl_module)
        if self.progress.start_step == 0 and trainer.global_step == 0 and self.stage.lr is not None:
            self._set_lr(trainer, self.stage.lr)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.active:
            return
        self._advance_if_done(trainer, pl_module)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if not self.active:
            return
        if self.stage.steps is not None:
            self._advance_if_done(trainer, pl_module)
        s = self.stage
        if s.lr is not None and s.lr_end is not None:
            length = self._stage_length_steps(trainer)
            if length:
                t = min(1.0, (trainer.global_step - self.progress.start_step) / length)
                self._set_lr(trainer, s.lr_end + 0.5 * (s.lr - s.lr_end) * (1 + math.cos(math.pi * t)))
        pl_module.log("train/stage", float(self.progress.index), on_step=True, on_epoch=False, batch_size=1)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.active:
            self._stop_if_finished(trainer, epochs_done=trainer.current_epoch - self.progress.start_epoch)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # the last stage ends with its last epoch, not at the start of one more
        if self.active:
            self._stop_if_finished(trainer, epochs_done=trainer.current_epoch + 1 - self.progress.start_epoch)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.active:
            return
        s, p = self.stage, self.progress
        if s.monitor is None or trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(s.monitor)
        if value is None:
            raise KeyError(f"stage {s.name!r} monitors {s.monitor!r}, which is not logged; logged metrics: "
                           f"{', '.join(sorted(trainer.callback_metrics))}")
        value = float(value)
        better = p.best is None or (value < p.best - s.min_delta if s.mode == "min" else value > p.best + s.min_delta)
        if better:
            p.best, p.bad_checks = value, 0
        else:
            p.bad_checks += 1
            if p.bad_checks >= s.patience:
                self._advance_if_done(trainer, pl_module, force=True)
