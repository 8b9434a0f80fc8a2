"""Equivariant continuous normalizing flow as a Lightning module (equivariant flow matching, Klein,
Krämer & Noé 2023; Transferable Boltzmann Generators, Klein & Noé 2024).

Density: ``CartesianCoordinates`` (centred, divided by one global ``scale`` in nm, fitted as the RMS
of the centred training coordinates unless given) and ``bg.flows.ContinuousFlow``, a CNF on the
mean-free subspace whose vector field is an EGNN over atom tokens (``encoding``); it is equivariant to
rotations, reflections, translations and permutations of identical atoms by construction, so no
augmentation is needed.

Prior (``prior``): the standard Gaussian on mean-free frames, or the harmonic one over the bond graph
(``bg.flows.mean_free_priors``: bonded atoms start close, its width fitted to the training frames' bonds).

Training: the ``flow_matching`` loss term (conditional paths with noise ``sigma`` in flow units,
``pairing``: ``independent`` or equivariant ``ot``). Sampling solves the ODE with the exact
divergence (``solver``, ``rtol``, ``atol``, ``steps``): log q = log p₀(x₀) − ∫ div v dt − 3(N−1)·log(scale).
Samples and densities come from ODE solves without gradients, so the proposal is not differentiable:
no reverse KL, no SMC.

Reweighting hygiene (``bg.systems.hygiene``, the proposal's checks): the flow gives mirror images the
same density, so frames whose chiral centres are all inverted are mirrored (``chirality: mirror``; their
density is then 2q, which log_q includes), frames with mixed or wrong chirality dropped (``drop``) and
frames whose bond graph differs from the topology dropped (``drop_broken``). Dropped frames keep their
place with log_w = −inf, so the ESS is over all samples drawn; the per-sample flags
(``wrong_chirality``, ``mirrored``, ``broken_topology``, ``valid``) travel with the samples.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from bg.coordinates import CartesianCoordinates
from bg.flows import EGNN, CartesianDensity, ContinuousFlow, ODESolver
from bg.flows.cnf import ODEMethod, Pairing, PriorKind
from bg.flows.mean_free_priors import HarmonicPrior, IsotropicPrior
from bg.models.base import BoltzmannGenerator
from bg.sampling import Proposal, SMCSampler
from bg.systems import MolecularSystem
from bg.systems.encodings import ENCODING_VOCAB, Encoding, atom_tokens, identical_atom_groups
from bg.systems.hygiene import ChiralityMode, FrameChecks


class EquivariantCNF(BoltzmannGenerator):
    """EGNN continuous normalizing flow trained by flow matching (see module docstring).

    Args:
        hidden, layers, coord_hidden: EGNN width, depth, and whether φ_x has a hidden layer (``bg.flows.EGNN``).
        encoding: atom tokens: ``element``, ``backbone`` or ``full`` (``bg.systems.encodings``).
        scale: nm per flow unit; ``None`` fits it to the training frames.
        sigma: std of the noise around the conditional paths (flow units). The model's samples inherit it:
            0.01 flow units (~0.0017 nm on alanine dipeptide) raise MD frames' energies by ~10 kT.
        time_exponent: training times have density k·t^(k−1); k > 1 trains late times (fine geometry) more.
        prior: ``isotropic`` (standard Gaussian on mean-free frames) or ``harmonic`` (precision α·L per axis,
            L the bond graph's Laplacian, α fitted so that the prior's bonds match the data's on average).
        pairing: ``independent`` or ``ot`` (equivariant OT within each batch, ``bg.flows.pairing``).
        ot_chunk: OT pairs within chunks of this many frames of a batch (``None``: the whole batch; the
            cost grows as chunk × batch).
        solver: ODE method for sampling and densities: ``dopri5`` (adaptive) or ``euler``/``midpoint``/``rk4``.
        rtol, atol: tolerances of adaptive solvers.
        steps: steps over [0, 1] of fixed-step solvers.
        chirality: ``mirror``, ``drop`` or ``keep`` samples with inverted chiral centres.
        drop_broken: drop samples whose bond graph (from distances) differs from the topology.
        bond_tolerance: bond cut-off as a multiple of the sum of covalent radii.
        **kwargs: see ``BoltzmannGenerator`` (here ``sample_batch_size`` defaults to 250 and
            ``predict_samples`` to 1000).
    """

    loss_terms = ("flow_matching",)

    def __init__(self, hidden: int = 64, layers: int = 4, coord_hidden: bool = False, encoding: Encoding = "full",
                 scale: float | None = None, sigma: float = 0.01, time_exponent: float = 1.0,
                 prior: PriorKind = "isotropic",
                 pairing: Pairing = "independent",
                 ot_chunk: int | None = 64, solver: ODEMethod = "dopri5", rtol: float = 1e-4, atol: float = 1e-4,
                 steps: int = 20, chirality: ChiralityMode = "mirror", drop_broken: bool = True,
                 bond_tolerance: float = 1.3, sample_batch_size: int = 250, predict_samples: int = 1000, **kwargs):
        super().__init__(sample_batch_size=sample_batch_size, predict_samples=predict_samples, **kwargs)
        if scale is not None and scale <= 0:
            raise ValueError(f"model.scale must be positive (nm), got {scale}")
        if sigma < 0:
            raise ValueError(f"model.sigma must be ≥ 0, got {sigma}")
        if time_exponent <= 0:
            raise ValueError(f"model.time_exponent must be positive, got {time_exponent}")
        if isinstance(self.sampler, SMCSampler):
            raise ValueError("EquivariantCNF does not support SMC: the Langevin moves need ∇ log q, i.e. a "
                             "differentiable ODE solve through the exact divergence; use sampler: null or "
                             "bg.sampling.ImportanceSampler")
        self.ode = ODESolver(solver, rtol, atol, steps)
        self.checks: FrameChecks | None = None
        self.groups: list[Tensor] = []

    def build_density(self, system: MolecularSystem) -> CartesianDensity:
        hp, n = self.hparams, system.topology.n_atoms
        tokens = atom_tokens(system.topology, hp.encoding)
        self.groups = identical_atom_groups(tokens)
        field = EGNN(tokens, ENCODING_VOCAB[hp.encoding], hidden=hp.hidden, layers=hp.layers,
                     coord_hidden=hp.coord_hidden)
        self.checks = FrameChecks(system.topology, system.positions, hp.bond_tolerance)
        if hp.prior == "harmonic":
            prior = HarmonicPrior(n, torch.tensor([[a.index, b.index] for a, b in system.topology.bonds]))
        else:
            prior = IsotropicPrior(n)
        return CartesianDensity(CartesianCoordinates(n, hp.scale), ContinuousFlow(field, n, self.ode, prior))

    @property
    def scale(self) -> Tensor:
        """nm per flow unit (float64 scalar)."""
        return self.representation.scale

    @property
    def proposal(self) -> Proposal:
        return Proposal(self.density, self.sample_batch_size, checks=self.check_samples, differentiable=False,
                        name=type(self).__name__, topology=self.topology)

    def log_prob(self, x: Tensor, divergence: str = "exact") -> Tensor:
        """log q ``(B,)`` of frames ``(B, N, 3)`` nm by solving back to the prior (3N backward passes per
        function evaluation with the exact divergence; ``"hutchinson"`` for a cheap unbiased estimate)."""
        return self.density.log_prob(x, divergence=divergence)

    def check_samples(self, x: Tensor, log_q: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Chirality and bond-graph checks: mirrored frames replace inverted ones; flags ``wrong_chirality``,
        ``mirrored``, ``broken_topology`` and ``valid`` (dropped samples get log_w = −inf)."""
        hp = self.hparams
        checked = self.checks.apply(x, hp.chirality, hp.drop_broken)
        x = checked.pop("x")
        if hp.chirality == "mirror" and len(self.checks.centres):
            log_q = log_q + math.log(2.0)  # q(x) + q(mirror x) = 2q(x) on the folded (correct) half
        return x, log_q, checked

    def term_flow_matching(self, x: Tensor) -> Tensor:
        return self._flow_matching(x, self.hparams.time_exponent)

    def _flow_matching(self, x: Tensor, time_exponent: float) -> Tensor:
        hp = self.hparams
        y, _ = self.representation(x.double())
        return self.flow.flow_matching_loss(y, hp.sigma, hp.pairing, self.groups, hp.ot_chunk, time_exponent)

    # The NLL needs 3N backward passes per ODE step: the held-out loss is the flow-matching loss
    # (SampleEvaluation measures the sampler itself).
    # Held-out times stay uniform, so val/flow_matching compares runs with different time_exponent.
    def validation_loss(self, x: Tensor) -> tuple[str, Tensor]:
        return "flow_matching", self._flow_matching(x, 1.0)
