"""TarFlow on all-atom Cartesian coordinates as a Lightning module (Sequential Boltzmann Generators,
Tan et al. 2025), made softly equivariant by augmentation (``representation="cartesian"``) or working in
the molecule's body frame (``"frame"``).

Density: ``CartesianCoordinates`` (centred, divided by one global ``scale`` in nm, fitted as the RMS of
the centred training coordinates unless given) and ``bg.flows.CartesianTarFlow`` (N tokens of 3
numbers, ``tokens="atom"``, or 3N tokens of 1, ``"coordinate"``, with the CoM correction of
``bg.coordinates.com``, ``com_correction``). In training every frame is also rotated by a uniform
random rotation (``rotations``) and shifted as a whole by CoM noise N(0, σ² I₃) (σ = ``com_sigma`` in
flow units, default 1/√N), so the flow learns p(shape)·N(CoM) on all 3N numbers without being
equivariant by construction.

Loss terms: ``nll`` (maximum likelihood on augmented MD frames) and ``kl`` (reverse KL with
reparameterised samples; expensive: the inverse is sequential).

``representation="frame"``: ``bg.coordinates.FrameCoordinates`` (3N − 6 body-frame coordinates of three
root atoms, standardised per entry) and ``bg.flows.FrameTarFlow``: rotations and translations are removed
exactly, so there is no augmentation, no CoM noise and no CoM correction (``scale``, ``rotations``,
``com_sigma`` and ``com_correction`` are unused), log q is an exact Cartesian density in the convention of
the internal coordinates, and SMC moves Cartesian frames (the default ``bg.sampling.Proposal``).

Densities (``"cartesian"``): ``sample`` returns ``log_q = log q_flow(x) − log h(c) − 3(N−1)·log(scale)``, the Cartesian
density of the centred frame in the sense of extended-space importance sampling, so the usual
``log_w = −u − log_q`` are valid weights. ``log_prob`` of frames evaluates the flow at CoM 0 with the
Gaussian correction. SMC particles (``proposal``, :class:`CoMProposal`) are flow samples in nm with
their CoM kept, so the Langevin moves act on all 3N coordinates with the target u(x) − log h(c).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from bg.coordinates import CartesianCoordinates, FrameCoordinates, add_com_noise, centred
from bg.coordinates.com import ComCorrection
from bg.flows import CartesianDensity, CartesianTarFlow, FrameTarFlow
from bg.flows.tarflow import Tokens
from bg.models.base import BoltzmannGenerator
from bg.sampling import Energy, Proposal
from bg.systems import MolecularSystem


Representation = Literal["cartesian", "frame"]


class CoMProposal(Proposal):
    """SMC on the TarFlow's own space: particles are flow samples in nm with their CoM, the source density
    is the flow's over all 3N numbers and the target u(centred x) − log h(CoM) (extended space)."""

    @property
    def flow(self) -> CartesianTarFlow:
        return self.density.flow

    @property
    def scale(self) -> Tensor:
        return self.density.representation.scale

    @torch.no_grad()
    def particles(self, n: int) -> Tensor:
        bs = self.batch_size
        return torch.cat([self.flow.net_sample(min(bs, n - i))[0] * self.scale for i in range(0, n, bs)])

    def log_prob(self, s: Tensor) -> Tensor:
        return self.flow.net_log_prob(s / self.scale)

    def frames(self, s: Tensor) -> Tensor:
        return centred(s)

    def target(self, u: Energy) -> Energy:
        return lambda s: u(centred(s)) - self.flow.com_log_density(s / self.scale)


class TarFlowGenerator(BoltzmannGenerator):
    """TarFlow Boltzmann generator over Cartesian coordinates (see module docstring).

    Args:
        channels, blocks, layers, heads, mlp_ratio, max_log_scale: see ``bg.flows.TarFlow``.
        tokens: ``"atom"`` (N tokens of 3) or ``"coordinate"`` (3N tokens of 1); with ``"frame"`` N − 2 and 3N − 6.
        representation: ``"cartesian"`` (centred frames with augmentation and CoM noise) or ``"frame"``
            (body-frame coordinates; the four options below are then unused).
        scale: nm per flow unit; ``None`` fits it to the training frames (RMS of centred coordinates).
        rotations: a uniform random rotation per training frame (soft rotation equivariance).
        com_sigma: std of the CoM noise per axis in flow units; ``None``: 1/√N.
        com_correction: ``"gaussian"``, ``"chi3"`` or ``"none"`` (``bg.coordinates.com``).
        kl_batch_size: samples per ``kl`` evaluation.
        **kwargs: see ``BoltzmannGenerator`` (loss weights, lr, energy settings, sampling, sampler).
    """

    loss_terms = ("nll", "kl", "kl_path", "fkl_is", "logvar", "alpha2", "nll_mcmc")
    key_renames = {"flow.": "density.flow.net.", "representation.": "density.representation."}

    def __init__(self, channels: int = 128, blocks: int = 4, layers: int = 2, heads: int = 4, mlp_ratio: int = 4,
                 max_log_scale: float = 4.0, tokens: Tokens = "atom", representation: Representation = "cartesian",
                 scale: float | None = None, rotations: bool = True,
                 com_sigma: float | None = None, com_correction: ComCorrection = "gaussian", kl_batch_size: int = 128,
                 **kwargs):
        super().__init__(**kwargs)
        if scale is not None and scale <= 0:
            raise ValueError(f"model.scale must be positive (nm), got {scale}")
        if com_sigma is not None and com_sigma <= 0:
            raise ValueError(f"model.com_sigma must be positive, got {com_sigma}")

    def build_density(self, system: MolecularSystem) -> CartesianDensity:
        hp, n = self.hparams, system.topology.n_atoms
        net = dict(channels=hp.channels, blocks=hp.blocks, layers=hp.layers, heads=hp.heads, mlp_ratio=hp.mlp_ratio,
                   max_log_scale=hp.max_log_scale)
        if self.framed:
            return CartesianDensity(FrameCoordinates(system.topology), FrameTarFlow(n, hp.tokens, **net))
        flow = CartesianTarFlow(n, hp.tokens, hp.com_sigma, hp.com_correction, **net)
        return CartesianDensity(CartesianCoordinates(n, hp.scale), flow)

    @property
    def framed(self) -> bool:
        """Whether the flow works in the body frame (``representation="frame"``)."""
        return self.hparams.representation == "frame"

    @property
    def scale(self) -> Tensor:
        """nm per flow unit (float64 scalar; ``representation="cartesian"`` only)."""
        if self.framed:
            raise RuntimeError("a TarFlow in the body frame has no global scale (its coordinates are standardised "
                                 "per entry: density.representation.mean/std)")
        return self.representation.scale

    @property
    def proposal(self) -> Proposal:
        if self.framed:
            return super().proposal
        return CoMProposal(self.density, self.sample_batch_size, name=type(self).__name__, topology=self.topology)

    def augment(self, x: Tensor) -> Tensor:
        """Training frames ``(B, N, 3)`` nm → flow units: centred, randomly rotated, scaled, CoM noise."""
        x = x.double()
        if self.hparams.rotations:
            x = self.representation.augment(x)
        return add_com_noise(self.representation(x)[0], self.flow.com_sigma)

    def term_nll(self, x: Tensor) -> Tensor:
        if self.framed:
            return super().term_nll(x)
        xf = self.augment(x)
        return -(self.flow.log_prob(xf) - self.representation.log_scale(xf)).mean()
