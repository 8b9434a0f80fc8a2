"""What a generator writes into its checkpoints besides the weights, and how older checkpoints load.

A bg checkpoint carries the molecule (``bg_system``: topology, force field, temperature), so that
``bg.load_generator`` needs neither the config nor the MD data, the class, the current loss weights,
the skipped-step count and rank 0's random stream (an exact single-device resume). ``bg_format``
versions the state-dict layout; older layouts are upgraded by renaming key prefixes
(``key_renames``, per family) before the weights load.
"""

from __future__ import annotations

from typing import Any

import torch

from bg.checkpointing import CHECKPOINT_FORMAT, upgrade_state_dict
from bg.systems import MolecularSystem


class CheckpointHooks:
    """Checkpoint hooks of ``BoltzmannGenerator`` (a mixin: it uses the module's ``build``, ``system``,
    ``loss_weights`` and ``guard``)."""

    #: state-dict key prefixes of format-1 checkpoints (before the density existed) → today's
    key_renames: dict[str, str] = {"flow.": "density.flow.", "representation.": "density.representation."}
    #: options added after checkpoints of the family existed → the value those checkpoints were made with
    legacy_hparams: dict[str, Any] = {}

    def restore_legacy_hparams(self, checkpoint: dict[str, Any]) -> None:
        """Options a checkpoint predates take the value it was made with, not today's default."""
        saved = checkpoint.get("hyper_parameters", {})
        for key, value in self.legacy_hparams.items():
            if key not in saved:
                self.hparams[key] = value

    def build_from_checkpoint(self, ckpt_path: str) -> None:
        """Build the (untrained) density for the molecule stored in a checkpoint; the weights are loaded
        afterwards by Lightning or ``load_state_dict``."""
        if not self.is_built:
            ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False, mmap=True)
            if "bg_system" not in ckpt:
                raise ValueError(f"{ckpt_path}: not a bg generator checkpoint (no 'bg_system' entry)")
            self.restore_legacy_hparams(ckpt)
            self.build(MolecularSystem.from_dict(ckpt["bg_system"]), None)

    def molecule_entries(self) -> dict[str, Any]:
        """What the checkpoint holds of the molecule (``bg_system``)."""
        return {"bg_system": self.system.to_dict()}

    def restore_molecule(self, checkpoint: dict[str, Any]) -> None:
        """Build the density for the checkpoint's molecule (unless built), before the weights load."""
        if not self.is_built:
            self.restore_legacy_hparams(checkpoint)
            self.build(MolecularSystem.from_dict(checkpoint["bg_system"]), None)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint.update(self.molecule_entries())
        checkpoint["bg_class"] = f"{type(self).__module__}.{type(self).__qualname__}"
        checkpoint["bg_format"] = CHECKPOINT_FORMAT
        checkpoint["bg_loss_weights"] = dict(self.loss_weights)
        checkpoint["bg_skipped_steps"] = self.guard.skipped
        checkpoint["bg_energy_evaluations"] = self.energy_evaluations
        checkpoint["bg_rng_state"] = torch.get_rng_state()  # an exact single-device resume

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.restore_molecule(checkpoint)
        if checkpoint.get("bg_format", 1) < CHECKPOINT_FORMAT:
            checkpoint["state_dict"] = upgrade_state_dict(checkpoint["state_dict"], self.key_renames)
        self.loss_weights = dict(checkpoint.get("bg_loss_weights", self.loss_weights))
        self.guard.skipped = int(checkpoint.get("bg_skipped_steps", 0))
        self.energy_evaluations = int(checkpoint.get("bg_energy_evaluations", 0))
        self._resume_rng = checkpoint.get("bg_rng_state")

