"""What every transferable generator shares: one set of weights, bound to one molecule at a time.

A transferable generator (``TransferableCNF``, ``TransferableNSF``) holds weights that do not depend on the
molecule; :meth:`TransferableGenerator.bind` makes a molecule's density (the shared weights with that
molecule's atoms, coordinates, intervals), its target energy (its own force field) and its sample checks the
ones ``sample``, ``log_prob``, ``energy``, ``proposal`` and ``predict`` use — the single-molecule API of
``BoltzmannGenerator`` for any molecule, seen in training or not. Bindings are cached by molecule name.

Training (``data: datamodules.PeptideSetDataModule`` with ``batch_mode: molecule``): every batch holds
frames of one peptide; the step binds it and takes the family's loss. Validation and test batches are
peptides never trained on; their losses are logged overall and per peptide (``val/<loss>/<SEQ>``).
Checkpoints hold the weights and the training set's description (``bg_peptides``: name, force field,
temperature, splits), no molecule.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from bg.energy import LazyTargetEnergy
from bg.flows import CartesianDensity
from bg.systems import MolecularSystem, molecule_system
from bg.systems.hygiene import FrameChecks


@dataclass
class Binding:
    """What a transferable generator holds for one molecule."""

    system: MolecularSystem
    density: CartesianDensity
    target: LazyTargetEnergy
    checks: FrameChecks | None = None
    groups: list[Tensor] = field(default_factory=list)
    #: the family's untrained start for this molecule (a density with no weights), where it has one
    start: CartesianDensity | None = None


class TransferableGenerator:
    """Mixin for a ``BoltzmannGenerator`` with molecule-independent weights (see module docstring).

    A family implements :meth:`make_binding` and may override :meth:`fit_to_frames` (data-dependent buffers
    fitted over all training peptides) and ``prebind_buffers`` (buffers a checkpoint must restore before the
    first ``bind``); its ``__init__`` calls :meth:`init_transferable` after the base class's."""

    #: buffers read from a checkpoint's state dict before binding (the weights load only afterwards)
    prebind_buffers: tuple[str, ...] = ()

    def init_transferable(self) -> None:
        #: the peptides the model trains on and the force field and temperature of new ones (``bg_peptides``)
        self.peptides: dict[str, Any] = {}
        self._bindings: dict[str, Binding] = {}
        self._bound: Binding | None = None
        self._molecules: list[str] = []  # the DataModule's molecule index → sequence

    # The base class treats these as attributes set once by build(); here they are the bound molecule's.
    @property
    def density(self) -> CartesianDensity | None:
        bound = self.__dict__.get("_bound")
        return None if bound is None else bound.density

    @density.setter
    def density(self, value: Any) -> None:
        if value is not None:
            raise AttributeError(f"a {type(self).__name__} builds one density per molecule: use bind(system)")

    # ------------------------------------------------------------------ molecules
    def make_binding(self, system: MolecularSystem) -> Binding:
        """The family's density, target and checks for ``system`` over the shared weights."""
        raise NotImplementedError

    def fit_to_frames(self, frames: list[Tensor]) -> None:
        """Fit data-dependent buffers to the training peptides' frames ``[(F_m, N_m, 3)]`` nm (default: none)."""

    def bind(self, molecule: MolecularSystem | str):
        """Make ``molecule`` (a ``MolecularSystem``, a one-letter peptide sequence — capped with Ace/Nme and
        built in the training set's force field — or a PDB path) the one ``sample``, ``log_prob``, ``energy``
        and ``predict`` work on. Returns the model."""
        if isinstance(molecule, str):
            molecule = molecule_system(molecule, self.peptides.get("temperature", 300.0), self.peptides.get("forcefield"))
        if molecule.name not in self._bindings:
            self._bindings[molecule.name] = self.make_binding(molecule)
        self._bound = self._bindings[molecule.name]
        self.system, self.target = self._bound.system, self._bound.target
        return self

    def _apply(self, fn, *args, **kwargs):
        # moving the model replaces its parameters and buffers: bindings (which share them) are rebuilt on next use
        out = super()._apply(fn, *args, **kwargs)
        bindings = self.__dict__.get("_bindings")
        if bindings is None:
            return out
        bound = self._bound.system if self._bound is not None else None
        bindings.clear()
        self._bound = None
        if bound is not None:
            self.bind(bound)
        return out

    # ------------------------------------------------------------------ building
    def build(self, system: MolecularSystem, train_positions: Tensor | None) -> None:
        if train_positions is not None:
            self.fit_to_frames([train_positions])
        self.bind(system)

    def build_from_checkpoint(self, ckpt_path: str) -> None:
        """The checkpoint holds no molecule: read the training set's description; ``configure_model`` binds the
        molecule to sample (``data.sequence``)."""
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False, mmap=True)
        if "bg_peptides" not in ckpt:
            raise ValueError(f"{ckpt_path}: not a {type(self).__name__} checkpoint (no 'bg_peptides' entry)")
        self.peptides = dict(ckpt["bg_peptides"])
        for name in self.prebind_buffers:
            getattr(self, name).copy_(ckpt["state_dict"][name])

    def configure_model(self) -> None:
        """Bind the DataModule's molecule: for ``predict``, ``data.sequence`` (any peptide); otherwise the
        first training peptide (each batch binds its own), after fitting to all training peptides."""
        if self._trainer is None:
            return
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "molecules"):
            if not self.is_built:
                raise ValueError(f"{type(self).__name__} needs a peptide-set DataModule "
                                 "(data: datamodules.PeptideSetDataModule)")
            return
        if getattr(dm, "batch_mode", "molecule") != "molecule":
            raise ValueError(f"{type(self).__name__} trains on batches of one peptide: data.batch_mode must be "
                             "'molecule'")
        self._molecules = list(dm.molecules)
        if self.trainer.state.fn == "predict":
            self.peptides = self.peptides or dm.description()
            self.bind(dm.predict_system())
            return
        dm.setup("fit")
        self.peptides = dm.description()
        if not self.is_built:
            self.fit_to_frames(dm.positions["train"])
            self.bind(dm.system(0))

    def bind_index(self, m: int) -> None:
        """Bind molecule m of the DataModule (the index batches carry)."""
        self.bind(self.trainer.datamodule.system(m))

    # ------------------------------------------------------------------ Lightning
    def molecule_batch(self, batch: dict[str, Tensor]) -> Tensor:
        """Bind the batch's peptide; its frames ``(B, N, 3)`` nm."""
        if not isinstance(batch, dict) or "molecule" not in batch:
            raise TypeError(f"{type(self).__name__} takes batches of datamodules.PeptideSetDataModule "
                            "({'x', 'molecule'})")
        if "mask" in batch:
            raise ValueError(f"{type(self).__name__} trains on batches of one peptide: data.batch_mode must be "
                             "'molecule'")
        self.bind_index(int(batch["molecule"][0]))
        return batch["x"]

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return super().training_step([self.molecule_batch(batch)], batch_idx)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._held_out_step(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._held_out_step(batch, "test")

    def _held_out_step(self, batch: dict[str, Tensor], split: str) -> None:
        x = self.molecule_batch(batch)
        name, value = self.validation_loss(x)
        self.log(f"{split}/{name}", value, prog_bar=split == "val", sync_dist=True, batch_size=len(x))
        self.log(f"{split}/{name}/{self._molecules[int(batch['molecule'][0])]}", value, sync_dist=True,
                 batch_size=len(x))

    # ------------------------------------------------------------------ checkpoints
    def molecule_entries(self) -> dict[str, Any]:
        return {"bg_system": None, "bg_peptides": dict(self.peptides)}

    def restore_molecule(self, checkpoint: dict[str, Any]) -> None:
        self.peptides = dict(checkpoint.get("bg_peptides") or self.peptides)
