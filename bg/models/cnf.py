"""Equivariant continuous normalizing flow as a Lightning module (equivariant flow matching, Klein,
Krämer & Noé 2023; Transferable Boltzmann Generators, Klein & Noé 2024).

Representation: a frame x ``(N, 3)`` nm is centred and divided by one global ``scale`` (nm; fitted
as the RMS of the centred training coordinates unless given). The flow is a CNF on the mean-free
subspace whose vector field is an EGNN over atom tokens (``encoding``); it is equivariant to
rotations, reflections, translations and permutations of identical atoms by construction, so no
augmentation is needed.

Training: the ``flow_matching`` loss term (conditional paths with noise ``sigma`` in flow units,
``pairing``: ``independent`` or equivariant ``ot``). Sampling solves the ODE with the exact
divergence (``solver``, ``rtol``, ``atol``, ``steps``): log q = log p₀(x₀) − ∫ div v dt − 3(N−1)·log(scale).

Reweighting hygiene (``bg.systems.hygiene``): the flow gives mirror images the same density, so
``sample_weighted`` mirrors frames whose chiral centres are all inverted (``chirality: mirror``; their
density is then 2q, which log_q includes), drops frames with mixed or wrong chirality (``drop``) and
frames whose bond graph differs from the topology (``drop_broken``). Dropped frames keep their
place with log_w = −inf, so the ESS is over all samples drawn; the rates are returned
(``wrong_chirality``, ``broken_topology``, ``valid``) and logged by ``SampleEvaluation``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from bg.coordinates import CartesianCoordinates, centred
from bg.flows import EGNN, ContinuousFlow, ODESolver
from bg.models.base import BoltzmannGenerator
from bg.sampling import Sampler, SMCSampler
from bg.systems import MolecularSystem
from bg.systems.encodings import ENCODING_VOCAB, ENCODINGS, atom_tokens, identical_atom_groups
from bg.systems.hygiene import CHIRALITY_MODES, FrameChecks


class EquivariantCNF(BoltzmannGenerator):
    """EGNN continuous normalizing flow trained by flow matching (see module docstring).

    Args:
        hidden, layers, coord_hidden: EGNN width, depth, and whether φ_x has a hidden layer (``bg.flows.EGNN``).
        encoding: atom tokens: ``element``, ``backbone`` or ``full`` (``bg.systems.encodings``).
        scale: nm per flow unit; ``None`` fits it to the training frames.
        sigma: std of the noise around the conditional paths (flow units).
        pairing: ``independent`` or ``ot`` (equivariant OT within each batch, ``bg.flows.pairing``).
        ot_chunk: OT pairs within chunks of this many frames of a batch (``None``: the whole batch; the
            cost grows as chunk × batch).
        solver: ODE method for sampling and densities: ``dopri5`` (adaptive) or ``euler``/``midpoint``/``rk4``.
        rtol, atol: tolerances of adaptive solvers.
        steps: steps over [0, 1] of fixed-step solvers.
        chirality: ``mirror``, ``drop`` or ``keep`` samples with inverted chiral centres.
        drop_broken: drop samples whose bond graph (from distances) differs from the topology.
        bond_tolerance: bond cut-off as a multiple of the sum of covalent radii.
        **kwargs: see ``BoltzmannGenerator``.
    """

    loss_terms = ("flow_matching",)

    def __init__(
        self,
        hidden: int = 64,
        layers: int = 4,
        coord_hidden: bool = False,
        encoding: str = "full",
        scale: float | None = None,
        sigma: float = 0.01,
        pairing: str = "independent",
        ot_chunk: int | None = 64,
        solver: str = "dopri5",
        rtol: float = 1e-4,
        atol: float = 1e-4,
        steps: int = 20,
        chirality: str = "mirror",
        drop_broken: bool = True,
        bond_tolerance: float = 1.3,
        loss_weights: dict[str, float] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        energy_backend: str = "auto",
        energy_compile: bool = False,
        energy_cut: float = 1e3,
        energy_workers: int = 0,
        sample_batch_size: int = 250,
        predict_samples: int = 1000,
        sampler: Sampler | None = None,
        max_skipped_in_a_row: int = 20,
    ):
        super().__init__(loss_weights=loss_weights or {"flow_matching": 1.0}, lr=lr, weight_decay=weight_decay,
                         energy_backend=energy_backend, energy_compile=energy_compile, energy_cut=energy_cut,
                         energy_workers=energy_workers, sample_batch_size=sample_batch_size,
                         predict_samples=predict_samples, sampler=sampler, max_skipped_in_a_row=max_skipped_in_a_row)
        self.save_hyperparameters(ignore=["sampler"])
        if encoding not in ENCODINGS:
            raise ValueError(f"model.encoding must be one of {', '.join(ENCODINGS)}, got {encoding!r}")
        if chirality not in CHIRALITY_MODES:
            raise ValueError(f"model.chirality must be one of {', '.join(CHIRALITY_MODES)}, got {chirality!r}")
        if pairing not in ("independent", "ot"):
            raise ValueError(f"model.pairing must be 'independent' or 'ot', got {pairing!r}")
        if scale is not None and scale <= 0:
            raise ValueError(f"model.scale must be positive (nm), got {scale}")
        if sigma < 0:
            raise ValueError(f"model.sigma must be ≥ 0, got {sigma}")
        if isinstance(sampler, SMCSampler):
            raise ValueError(self._NO_SMC)
        self.ode = ODESolver(solver, rtol, atol, steps)
        self.field_kwargs = dict(hidden=hidden, layers=layers, coord_hidden=coord_hidden)
        self.encoding, self.fixed_scale, self.sigma, self.pairing = encoding, scale, sigma, pairing
        self.ot_chunk = ot_chunk
        self.chirality, self.drop_broken, self.bond_tolerance = chirality, drop_broken, bond_tolerance
        self.flow: ContinuousFlow | None = None
        self.representation: CartesianCoordinates | None = None
        self.checks: FrameChecks | None = None
        self.groups: list[Tensor] = []

    _NO_SMC = ("EquivariantCNF does not support SMC: the Langevin moves need ∇ log q, i.e. a differentiable ODE "
               "solve through the exact divergence (3N backward passes per step, differentiated again); use "
               "sampler: null or bg.sampling.ImportanceSampler")

    # ------------------------------------------------------------------ building
    def build_model(self, system: MolecularSystem, train_positions: Tensor | None) -> None:
        n = system.topology.n_atoms
        if self.fixed_scale is not None:
            scale = self.fixed_scale
        elif train_positions is not None:
            scale = float(centred(train_positions.double()).square().mean().sqrt())
        else:
            scale = 1.0  # restored from a checkpoint: the buffer is overwritten by the state dict
        tokens = atom_tokens(system.topology, self.encoding)
        self.groups = identical_atom_groups(tokens)
        self.representation = CartesianCoordinates(n, scale).to(self.device)
        field = EGNN(tokens, ENCODING_VOCAB[self.encoding], **self.field_kwargs)
        self.flow = ContinuousFlow(field, n, self.ode).to(self.device)
        self.checks = FrameChecks(system.topology, system.positions, self.bond_tolerance)

    @property
    def scale(self) -> Tensor:
        """nm per flow unit (float64 scalar)."""
        return self.representation.scale

    @property
    def _flow_dtype(self) -> torch.dtype:
        return next(self.flow.parameters()).dtype

    # ------------------------------------------------------------------ generator API
    def sample_with_grad(self, n: int) -> tuple[Tensor, Tensor]:
        """``n`` samples ``(n, N, 3)`` nm (float64) and log q ``(n,)`` (exact divergence). The ODE solve is
        not differentiable here (no loss term needs it); the name follows the base API."""
        xf, log_q = self.flow.sample(n, self._flow_dtype, self.device)
        return self.representation.inverse(xf.double())[0], log_q.double() - self.representation.log_scale(xf)

    def log_prob(self, x: Tensor, divergence: str = "exact") -> Tensor:
        """log q ``(B,)`` of frames ``(B, N, 3)`` nm by solving back to the prior (3N backward passes per
        function evaluation with the exact divergence; ``"hutchinson"`` for a cheap unbiased estimate)."""
        y, _ = self.representation(x.double())
        return self.flow.log_prob(y.to(self._flow_dtype), divergence).double() - self.representation.log_scale(y)

    def check_samples(self, x: Tensor, log_q: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Chirality and bond-graph checks: mirrored frames replace inverted ones; flags ``wrong_chirality``,
        ``mirrored``, ``broken_topology`` and ``valid`` (dropped samples get log_w = −inf)."""
        checked = self.checks.apply(x, self.chirality, self.drop_broken)
        x = checked.pop("x")
        if self.chirality == "mirror" and len(self.checks.centres):
            log_q = log_q + math.log(2.0)  # q(x) + q(mirror x) = 2q(x) on the folded (correct) half
        return x, log_q, checked

    def run_sampler(self, n: int, sampler: Sampler | None = None, generator: torch.Generator | None = None,
                    progress: bool = False) -> dict:
        if isinstance(sampler or self.sampler, SMCSampler):
            raise ValueError(self._NO_SMC)
        return super().run_sampler(n, sampler, generator, progress)

    # ------------------------------------------------------------------ loss terms
    def term_flow_matching(self, x: Tensor) -> Tensor:
        y, _ = self.representation(x.double())
        return self.flow.flow_matching_loss(y.to(self._flow_dtype), self.sigma, self.pairing, self.groups, self.ot_chunk)

    # The NLL needs 3N backward passes per ODE step; validation logs the flow-matching loss instead
    # (SampleEvaluation measures the sampler itself).
    def validation_step(self, batch: list[Tensor], batch_idx: int) -> None:
        x = batch[0]
        self.log("val/flow_matching", self.term_flow_matching(x), prog_bar=True, sync_dist=True, batch_size=len(x))

    def test_step(self, batch: list[Tensor], batch_idx: int) -> None:
        x = batch[0]
        self.log("test/flow_matching", self.term_flow_matching(x), sync_dist=True, batch_size=len(x))
