"""One equivariant CNF for many peptides (Transferable Boltzmann Generators, Klein & Noé 2024).

The vector field is a transferable EGNN (``bg.flows.EGNN(tokens=None)``): its weights do not depend on
the molecule, whose atom tokens (``encoding``: residue type, atom name, residue index) enter each call.
A ``TransferableCNF`` is therefore *bound* to one molecule at a time (:meth:`bind`): the bound molecule's
density (``CartesianCoordinates`` with the model's one global ``scale`` ∘ ``ContinuousFlow`` over the
shared field), target energy (its own force field) and sample checks are what ``sample``, ``log_prob``,
``proposal``, ``energy`` and ``predict`` use — the whole single-molecule API of ``EquivariantCNF``, for
any peptide, seen in training or not.

Training (``data: datamodules.PeptideSetDataModule`` with ``batch_mode: molecule``): every batch holds
frames of one peptide; the step binds that peptide and takes the flow-matching loss (OT pairing within
its identical-atom groups). Validation batches are peptides the model never trains on, so ``val/flow_matching``
measures transfer; it is also logged per peptide (``val/flow_matching/<SEQ>``).

Sampling a peptide the model never saw::

    bg predict --config configs/peptides_cnf.yaml --ckpt_path <ckpt> --data.sequence AW

or in Python ``bg.load_generator(ckpt).bind("AW").sample(100)``. The checkpoint holds the field, the
scale and the training set's force field, temperature and sequences (``bg_peptides``), not a molecule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from bg.coordinates import CartesianCoordinates, centred
from bg.energy import LazyTargetEnergy
from bg.flows import EGNN, CartesianDensity, ContinuousFlow
from bg.models.cnf import EquivariantCNF
from bg.systems import MolecularSystem, molecule_system
from bg.systems.encodings import ENCODING_VOCAB, Encoding, atom_tokens, identical_atom_groups
from bg.systems.hygiene import FrameChecks


@dataclass
class Binding:
    """What a ``TransferableCNF`` holds for one molecule."""

    system: MolecularSystem
    density: CartesianDensity
    target: LazyTargetEnergy
    checks: FrameChecks
    groups: list[Tensor]


class TransferableCNF(EquivariantCNF):
    """An ``EquivariantCNF`` whose field serves any peptide (see module docstring); the options are
    ``EquivariantCNF``'s (``scale``: nm per flow unit, ``None`` fits one to all training peptides' frames)."""

    def __init__(self, hidden: int = 64, layers: int = 4, coord_hidden: bool = False, encoding: Encoding = "full",
                 **kwargs: Any):
        super().__init__(hidden=hidden, layers=layers, coord_hidden=coord_hidden, encoding=encoding, **kwargs)
        self.field = EGNN(None, ENCODING_VOCAB[encoding], hidden=hidden, layers=layers, coord_hidden=coord_hidden)
        # NaN until fitted to the training peptides (or loaded from a checkpoint)
        self.register_buffer("global_scale", torch.tensor(self.hparams.scale or math.nan, dtype=torch.float64))
        #: the peptides the model trains on and the force field and temperature of new ones (``bg_peptides``)
        self.peptides: dict[str, Any] = {}
        self._bindings: dict[str, Binding] = {}
        self._bound: Binding | None = None
        self._molecules: list[str] = []  # the DataModule's molecule index → sequence

    # The base class treats these as attributes set once by build(); here they are the bound molecule's.
    @property
    def density(self) -> CartesianDensity | None:
        return None if self._bound is None else self._bound.density

    @density.setter
    def density(self, value: Any) -> None:
        if value is not None:
            raise AttributeError("a TransferableCNF builds one density per molecule: use bind(system)")

    @property
    def checks(self) -> FrameChecks | None:
        return None if self._bound is None else self._bound.checks

    @checks.setter
    def checks(self, value: Any) -> None:
        pass  # set per molecule by bind()

    @property
    def groups(self) -> list[Tensor]:
        return [] if self._bound is None else self._bound.groups

    @groups.setter
    def groups(self, value: Any) -> None:
        pass  # set per molecule by bind()

    # ------------------------------------------------------------------ molecules
    def bind(self, molecule: MolecularSystem | str) -> "TransferableCNF":
        """Make ``molecule`` (a ``MolecularSystem``, a one-letter peptide sequence — capped with Ace/Nme and
        built in the training set's force field — or a PDB path) the one ``sample``, ``log_prob``, ``energy``
        and ``predict`` work on. Returns the model."""
        if isinstance(molecule, str):
            molecule = molecule_system(molecule, self.peptides.get("temperature", 300.0), self.peptides.get("forcefield"))
        system = molecule
        if not torch.isfinite(self.global_scale):
            raise RuntimeError("TransferableCNF: the scale is not fitted (train it, or load a checkpoint) before bind()")
        key = system.name
        if key not in self._bindings:
            hp, n = self.hparams, system.topology.n_atoms
            tokens = atom_tokens(system.topology, hp.encoding).to(self.global_scale.device)
            representation = CartesianCoordinates(n, 1.0)
            # the model's buffer itself: a checkpoint loaded after binding updates every bound density
            representation.scale = self.global_scale
            flow = ContinuousFlow(self.field.bind(tokens), n, self.ode)
            self._bindings[key] = Binding(
                system=system, density=CartesianDensity(representation, flow),
                target=LazyTargetEnergy(system, hp.energy_backend, hp.energy_compile, hp.energy_workers),
                checks=FrameChecks(system.topology, system.positions, hp.bond_tolerance),
                groups=identical_atom_groups(tokens.cpu()))
        self._bound = self._bindings[key]
        self.system, self.target = self._bound.system, self._bound.target
        return self

    def _apply(self, fn, *args, **kwargs):
        # moving the model replaces the scale buffer: bindings (which share it) are rebuilt on next use
        out = super()._apply(fn, *args, **kwargs)
        bound = self._bound.system if self._bound is not None else None
        self._bindings.clear()
        self._bound = None
        if bound is not None and torch.isfinite(self.global_scale):
            self.bind(bound)
        return out

    @torch.no_grad()
    def fit_scale(self, frames: list[Tensor]) -> float:
        """Set the global scale (unless ``scale`` was given) to the RMS of the centred coordinates over all
        frames ``[(F_m, N_m, 3)]`` nm of the training peptides; returns it (nm)."""
        if self.hparams.scale is None:
            total = sum(float(centred(f.double()).square().sum()) for f in frames)
            count = sum(f.numel() for f in frames)
            if count == 0:
                raise ValueError("TransferableCNF: no training frames to fit the scale to")
            self.global_scale.fill_(math.sqrt(total / count))
        return float(self.global_scale)

    # ------------------------------------------------------------------ building
    def build(self, system: MolecularSystem, train_positions: Tensor | None) -> None:
        if train_positions is not None and not torch.isfinite(self.global_scale):
            self.fit_scale([train_positions])
        self.bind(system)

    def build_from_checkpoint(self, ckpt_path: str) -> None:
        """The checkpoint holds no molecule: read the training set's description; ``configure_model`` binds the
        molecule to sample (``data.sequence``)."""
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False, mmap=True)
        if "bg_peptides" not in ckpt:
            raise ValueError(f"{ckpt_path}: not a TransferableCNF checkpoint (no 'bg_peptides' entry)")
        self.peptides = dict(ckpt["bg_peptides"])
        self.global_scale.fill_(float(ckpt["state_dict"]["global_scale"]))  # bind() needs it before the weights load

    def configure_model(self) -> None:
        """Bind the DataModule's molecule: for ``predict``, ``data.sequence`` (any peptide); otherwise the
        first training peptide (each batch binds its own), after fitting the scale to all training peptides."""
        if self._trainer is None:
            return
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "molecules"):
            if not self.is_built:
                raise ValueError("TransferableCNF needs a peptide-set DataModule (data: datamodules.PeptideSetDataModule)")
            return
        if getattr(dm, "batch_mode", "molecule") != "molecule":
            raise ValueError("TransferableCNF trains on batches of one peptide: data.batch_mode must be 'molecule'")
        self._molecules = list(dm.molecules)
        if self.trainer.state.fn == "predict":
            self.peptides = self.peptides or dm.description()
            self.bind(dm.predict_system())
            return
        dm.setup("fit")
        self.peptides = dm.description()
        if not torch.isfinite(self.global_scale):
            self.fit_scale(dm.positions["train"])
        if not self.is_built:
            self.bind(dm.system(0))

    def bind_index(self, m: int) -> None:
        """Bind molecule m of the DataModule (the index batches carry)."""
        self.bind(self.trainer.datamodule.system(m))

    # ------------------------------------------------------------------ Lightning
    def _batch(self, batch: dict[str, Tensor]) -> Tensor:
        if not isinstance(batch, dict) or "molecule" not in batch:
            raise TypeError("TransferableCNF takes batches of datamodules.PeptideSetDataModule ({'x', 'molecule'})")
        if "mask" in batch:
            raise ValueError("TransferableCNF trains on batches of one peptide: data.batch_mode must be 'molecule'")
        self.bind_index(int(batch["molecule"][0]))
        return batch["x"]

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return super().training_step([self._batch(batch)], batch_idx)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._held_out_step(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._held_out_step(batch, "test")

    def _held_out_step(self, batch: dict[str, Tensor], split: str) -> None:
        x = self._batch(batch)
        name, value = self.validation_loss(x)
        self.log(f"{split}/{name}", value, prog_bar=split == "val", sync_dist=True, batch_size=len(x))
        self.log(f"{split}/{name}/{self._molecules[int(batch['molecule'][0])]}", value, sync_dist=True,
                 batch_size=len(x))

    # ------------------------------------------------------------------ checkpoints
    def molecule_entries(self) -> dict[str, Any]:
        return {"bg_system": None, "bg_peptides": dict(self.peptides)}

    def restore_molecule(self, checkpoint: dict[str, Any]) -> None:
        self.peptides = dict(checkpoint.get("bg_peptides") or self.peptides)
