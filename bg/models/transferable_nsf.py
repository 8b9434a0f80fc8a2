"""One split-channel neural spline flow over internal coordinates for many peptides.

Single-molecule flows are strongest in internal coordinates (alanine dipeptide ESS/n 0.7–0.98 there
against 0.03–0.28 in Cartesian coordinates); a transferable one needs two things a single-molecule NSF
takes from the molecule's MD: conditioners that accept any list of coordinates, and spline intervals and a
base for coordinates never seen. ``TransferableNSF`` takes the first from atom-token conditioners
(``bg.flows.transferable_nsf``: each Z-matrix atom is a token carrying its bond, angle and torsion and what
the atom is) and the second from the molecule's force field (``bg.coordinates.harmonic``: the minimum and
the harmonic σ of every non-rotatable coordinate; rotatable torsions on the circle). Binding a molecule
(``bind``: a sequence, a PDB or a ``MolecularSystem``) therefore needs no MD of it.

Training (``data: datamodules.PeptideSetDataModule``, ``batch_mode: molecule``): each batch binds its
peptide; the loss terms are ``BoltzmannGenerator``'s (``nll`` on the batch's frames; ``kl``, ``kl_path``,
``fkl_is``, ``logvar``, ``alpha2`` on the flow's samples of that peptide with its own torch force field).

Sampling a peptide the model never saw::

    bg predict --config configs/peptides_nsf.yaml --ckpt_path <ckpt> --data.sequence AW

or ``bg.load_generator(ckpt).bind("AW").sample(1000)``.
"""

from __future__ import annotations

from typing import Any

from bg.coordinates import InternalCoordinates
from bg.coordinates.harmonic import harmonic_geometry, rotatable_torsions
from bg.energy import target_energy
from bg.flows import CartesianDensity
from bg.flows.coupling import CouplingMasks
from bg.flows.mixture import MixtureDensity
from bg.flows.transferable_nsf import Harmonic, TorsionPrior, TransferableSplineFlow, atom_token_layout
from bg.models.base import BoltzmannGenerator
from bg.models.transferable import Binding, TransferableGenerator
from bg.sampling import Proposal
from bg.systems import MolecularSystem, molecule_system
from bg.systems.peptide import minimize_positions


class TransferableNSF(TransferableGenerator, BoltzmannGenerator):
    """A split-channel NSF whose conditioners serve any peptide (see module docstring).

    Args:
        split_channels, backbone_layers, sidechain_layers, bins, width, depth, attention_dim, coupling_masks,
            interval_width, harmonic: the shared flow, see ``bg.flows.transferable_nsf.TransferableSplineFlow``
            (``harmonic: correlated`` whitens the bonds, angles and non-rotatable torsions by their harmonic
            covariance, ``independent`` puts each on its centre ± ``interval_width`` σ).
        torsion_prior, scan_temperature, scan_floor: where rotatable torsions start: ``uniform`` on the circle or
            from the peptide's rigid force-field ``scan`` (exp(−u/T) with a uniform share ``scan_floor``;
            ``configs/peptides_nsf.yaml`` uses ``scan``; the default stays ``uniform`` so that checkpoints saved
            before the option existed load as they were trained).
        chemistry_tokens, token_dropout: atom tokens that also carry element × bonds × ring membership of the atom
            and its reference atoms, and the chance that a token's residue type or atom names are hidden in
            training (``AtomTokenConditioner``); the defaults are what checkpoints saved before they existed hold.
        minimize_tolerance: kJ/mol/nm; each bound molecule's template is minimised to this before its Hessian.
        kl_batch_size: flow samples per energy-term evaluation.
        defensive: the share a₀ of proposal samples drawn from the flow's untrained start (harmonic geometry and
            torsion scans of the bound molecule, ``TransferableSplineFlow.start``) instead of the flow: samplers and
            evaluations then draw from the mixture (1 − a₀) q + a₀ q₀ (``bg.flows.MixtureDensity``), which bounds
            every importance weight by what it would be under the start alone, over a₀. Training is unchanged (the
            loss terms use the flow itself), so it can be set on any checkpoint; 0 (default): the flow alone; 1: the
            start alone (a baseline that needs no training).
        **kwargs: see ``BoltzmannGenerator``.
    """

    loss_terms = ("nll", "kl", "kl_path", "fkl_is", "logvar", "alpha2")

    def __init__(self, split_channels: bool = True, backbone_layers: int = 8, sidechain_layers: int = 4, bins: int = 8,
                 width: int = 64, depth: int = 2, attention_dim: int = 32, coupling_masks: CouplingMasks = "interleaved",
                 interval_width: float = 8.0, harmonic: Harmonic = "correlated", torsion_prior: TorsionPrior = "uniform",
                 scan_temperature: float = 2.0, scan_floor: float = 0.2, chemistry_tokens: bool = False,
                 token_dropout: float = 0.0, minimize_tolerance: float = 1.0, kl_batch_size: int = 256,
                 defensive: float = 0.0, **kwargs: Any):
        super().__init__(**kwargs)
        self.defensive = defensive
        self.shared = TransferableSplineFlow(split_channels, backbone_layers, sidechain_layers, bins, width, depth,
                                             attention_dim, coupling_masks, interval_width, harmonic, torsion_prior,
                                             scan_temperature, scan_floor, chemistry_tokens, token_dropout)
        self.init_transferable()

    def make_binding(self, system: MolecularSystem) -> Binding:
        self._know_training_tokens()
        representation = InternalCoordinates(system.topology)
        # the torch force field in float64 on the CPU: the Hessian needs double backward (OpenMM has none)
        energy = target_energy(system, backend="torch", compile=False)
        template = minimize_positions(system, tolerance=self.hparams.minimize_tolerance)
        scans = 360 if self.hparams.torsion_prior == "scan" else 0  # 0.1–0.5 s per peptide, only where used
        geometry = harmonic_geometry(representation, energy, template, scan_points=scans)
        flow = self.shared.bind(representation, geometry)
        representation = representation.to(flow.kinds.device)
        density = CartesianDensity(representation, flow)
        start = CartesianDensity(representation, self.shared.start(flow))
        return Binding(system=system, density=density, target=self.new_target(system), start=start)

    @property
    def defensive(self) -> float:
        """The share of proposal samples drawn from the flow's untrained start (see class docstring)."""
        return self._defensive

    @defensive.setter
    def defensive(self, share: float) -> None:
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"model.defensive is the share of samples drawn from the flow's start: in [0, 1], got "
                             f"{share}")
        self._defensive = float(share)

    @property
    def proposal(self) -> Proposal:
        """The bound flow as samplers see it; with ``defensive`` > 0 the mixture of the flow and its start."""
        if not self.defensive:
            return super().proposal
        if self.defensive == 1.0:
            return Proposal(self._bound.start, self.sample_batch_size, differentiable=True,
                            name=f"the start of {type(self).__name__}", topology=self.topology)
        mixture = MixtureDensity([self.density, self._bound.start], [1.0 - self.defensive, self.defensive])
        return Proposal(mixture, self.sample_batch_size, differentiable=True,
                        name=f"{type(self).__name__} + {self.defensive:g} of its start", topology=self.topology)

    def _know_training_tokens(self) -> None:
        """Tell the conditioners which token values the training peptides hold (``set_known``: never-seen residue
        types and atom names are embedded as the mean of the known ones), once per training set."""
        train = tuple(self.peptides.get("train", ()))
        if not train or getattr(self, "_known_for", None) == train:
            return
        identities = []
        for sequence in train:
            topology = molecule_system(sequence, self.peptides.get("temperature", 300.0),
                                       self.peptides.get("forcefield")).topology
            representation = InternalCoordinates(topology)
            identities.append(atom_token_layout(representation, rotatable_torsions(representation)).identity)
        self.shared.set_known(identities)
        self._known_for = train
