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
from typing import Any

import torch
from torch import Tensor

from bg.coordinates import CartesianCoordinates, centred
from bg.flows import EGNN, CartesianDensity, ContinuousFlow
from bg.models.cnf import EquivariantCNF
from bg.models.transferable import Binding, TransferableGenerator
from bg.systems import MolecularSystem
from bg.systems.encodings import ENCODING_VOCAB, Encoding, atom_tokens, identical_atom_groups
from bg.systems.hygiene import FrameChecks


class TransferableCNF(TransferableGenerator, EquivariantCNF):
    """An ``EquivariantCNF`` whose field serves any peptide (see module docstring and
    ``bg.models.transferable``); the options are ``EquivariantCNF``'s (``scale``: nm per flow unit, ``None``
    fits one to all training peptides' frames)."""

    prebind_buffers = ("global_scale",)  # bind() needs the scale before the weights load

    def __init__(self, hidden: int = 64, layers: int = 4, coord_hidden: bool = False, encoding: Encoding = "full",
                 **kwargs: Any):
        super().__init__(hidden=hidden, layers=layers, coord_hidden=coord_hidden, encoding=encoding, **kwargs)
        self.field = EGNN(None, ENCODING_VOCAB[encoding], hidden=hidden, layers=layers, coord_hidden=coord_hidden)
        # NaN until fitted to the training peptides (or loaded from a checkpoint)
        self.register_buffer("global_scale", torch.tensor(self.hparams.scale or math.nan, dtype=torch.float64))
        self.init_transferable()

    @property
    def checks(self) -> FrameChecks | None:
        bound = self.__dict__.get("_bound")
        return None if bound is None else bound.checks

    @checks.setter
    def checks(self, value: Any) -> None:
        pass  # set per molecule by bind()

    @property
    def groups(self) -> list[Tensor]:
        bound = self.__dict__.get("_bound")
        return [] if bound is None else bound.groups

    @groups.setter
    def groups(self, value: Any) -> None:
        pass  # set per molecule by bind()

    def make_binding(self, system: MolecularSystem) -> Binding:
        if not torch.isfinite(self.global_scale):
            raise RuntimeError("TransferableCNF: the scale is not fitted (train it, or load a checkpoint) before bind()")
        hp, n = self.hparams, system.topology.n_atoms
        tokens = atom_tokens(system.topology, hp.encoding).to(self.global_scale.device)
        representation = CartesianCoordinates(n, 1.0)
        # the model's buffer itself: a checkpoint loaded after binding updates every bound density
        representation.scale = self.global_scale
        flow = ContinuousFlow(self.field.bind(tokens), n, self.ode)
        return Binding(system=system, density=CartesianDensity(representation, flow), target=self.new_target(system),
                       checks=FrameChecks(system.topology, system.positions, hp.bond_tolerance),
                       groups=identical_atom_groups(tokens.cpu()))

    def fit_to_frames(self, frames: list[Tensor]) -> None:
        if not torch.isfinite(self.global_scale):
            self.fit_scale(frames)

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
