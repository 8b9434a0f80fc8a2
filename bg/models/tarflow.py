"""TarFlow on all-atom Cartesian coordinates as a Lightning module (Sequential Boltzmann Generators,
Tan et al. 2025), made softly equivariant by augmentation.

Representation: a frame x ``(N, 3)`` nm is centred, divided by one global ``scale`` (nm; fitted as
the RMS of the centred training coordinates unless given) and fed to the flow as N tokens of 3
numbers (``tokens="atom"``) or 3N tokens of 1 (``"coordinate"``, for very small molecules). In
training every frame is also rotated by a uniform random rotation (``rotations``) and shifted as a
whole by CoM noise N(0, σ² I₃) (σ = ``com_sigma`` in flow units, default 1/√N: the CoM spread of
the flow's N(0, I) prior), so the flow learns p(shape)·N(CoM) on all 3N numbers without being
equivariant by construction. Sampling centres the flow's output; its density is corrected for the
CoM as ``bg.coordinates.com`` explains (``com_correction``).

Loss terms: ``nll`` (maximum likelihood on augmented MD frames) and ``kl`` (reverse KL to the
extended target p(y)·h(c) with reparameterised samples; expensive: the inverse is sequential).

Densities: ``sample`` returns ``log_q = log q_flow(x) − log h(c) − 3(N−1)·log(scale)``, the Cartesian
density of the centred frame in the sense of extended-space importance sampling, so the usual
``log_w = −u − log_q`` are valid weights. ``log_prob`` of frames (which carry no CoM information)
evaluates the flow at CoM 0 with the Gaussian correction, a deterministic estimate for NLLs.
Particles for SMC (``draw_particles``) are flow samples in nm with their CoM kept, so the Langevin
moves act on all 3N coordinates with the target u(x) − log h(c).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from bg.coordinates import COM_CORRECTIONS, CartesianCoordinates, add_com_noise, centred, com_log_density
from bg.flows import TarFlow
from bg.models.base import BoltzmannGenerator
from bg.sampling import Sampler
from bg.systems import MolecularSystem

TOKENS = ("atom", "coordinate")


class TarFlowGenerator(BoltzmannGenerator):
    """TarFlow Boltzmann generator over Cartesian coordinates (see module docstring).

    Args:
        channels, blocks, layers, heads, mlp_ratio, max_log_scale: see ``bg.flows.TarFlow``.
        tokens: ``"atom"`` (N tokens of 3) or ``"coordinate"`` (3N tokens of 1).
        scale: nm per flow unit; ``None`` fits it to the training frames (RMS of centred coordinates).
        rotations: a uniform random rotation per training frame (soft rotation equivariance).
        com_sigma: std of the CoM noise per axis in flow units; ``None``: 1/√N.
        com_correction: ``"gaussian"``, ``"chi3"`` or ``"none"`` (``bg.coordinates.com``).
        kl_batch_size: samples per ``kl`` evaluation.
        **kwargs: see ``BoltzmannGenerator`` (loss weights, lr, energy settings, sampling, sampler).
    """

    loss_terms = ("nll", "kl")

    def __init__(
        self,
        channels: int = 128,
        blocks: int = 4,
        layers: int = 2,
        heads: int = 4,
        mlp_ratio: int = 4,
        max_log_scale: float = 4.0,
        tokens: str = "atom",
        scale: float | None = None,
        rotations: bool = True,
        com_sigma: float | None = None,
        com_correction: str = "gaussian",
        kl_batch_size: int = 128,
        loss_weights: dict[str, float] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        energy_backend: str = "auto",
        energy_compile: bool = False,
        energy_cut: float = 1e3,
        energy_workers: int = 0,
        sample_batch_size: int = 1000,
        predict_samples: int = 10_000,
        sampler: Sampler | None = None,
        max_skipped_in_a_row: int = 20,
    ):
        super().__init__(loss_weights=loss_weights, lr=lr, weight_decay=weight_decay, energy_backend=energy_backend,
                         energy_compile=energy_compile, energy_cut=energy_cut, energy_workers=energy_workers,
                         sample_batch_size=sample_batch_size, predict_samples=predict_samples, sampler=sampler,
                         max_skipped_in_a_row=max_skipped_in_a_row)
        self.save_hyperparameters(ignore=["sampler"])
        if tokens not in TOKENS:
            raise ValueError(f"model.tokens must be one of {', '.join(TOKENS)}, got {tokens!r}")
        if com_correction not in COM_CORRECTIONS:
            raise ValueError(f"model.com_correction must be one of {', '.join(COM_CORRECTIONS)}, got {com_correction!r}")
        if scale is not None and scale <= 0:
            raise ValueError(f"model.scale must be positive (nm), got {scale}")
        if com_sigma is not None and com_sigma <= 0:
            raise ValueError(f"model.com_sigma must be positive, got {com_sigma}")
        self.flow_kwargs = dict(channels=channels, blocks=blocks, layers=layers, heads=heads, mlp_ratio=mlp_ratio,
                                max_log_scale=max_log_scale)
        self.tokens, self.fixed_scale, self.rotations = tokens, scale, rotations
        self.com_sigma_arg, self.com_correction, self.kl_batch_size = com_sigma, com_correction, kl_batch_size
        self.flow: TarFlow | None = None
        self.representation: CartesianCoordinates | None = None
        self.n_atoms = 0

    # ------------------------------------------------------------------ building
    def build_model(self, system: MolecularSystem, train_positions: Tensor | None) -> None:
        n = system.topology.n_atoms
        self.n_atoms = n
        if self.fixed_scale is not None:
            scale = self.fixed_scale
        elif train_positions is not None:
            scale = float(centred(train_positions.double()).square().mean().sqrt())
        else:
            scale = 1.0  # restored from a checkpoint: the buffer is overwritten by the state dict
        self.representation = CartesianCoordinates(n, scale).to(self.device)
        t, d = (n, 3) if self.tokens == "atom" else (3 * n, 1)
        self.flow = TarFlow(n_tokens=t, token_dim=d, **self.flow_kwargs).to(self.device)

    @property
    def scale(self) -> Tensor:
        """nm per flow unit (float64 scalar)."""
        return self.representation.scale

    @property
    def com_sigma(self) -> float:
        return self.com_sigma_arg if self.com_sigma_arg is not None else 1.0 / math.sqrt(self.n_atoms)

    @property
    def _token_shape(self) -> tuple[int, int]:
        return (self.n_atoms, 3) if self.tokens == "atom" else (3 * self.n_atoms, 1)

    def _flow_log_prob(self, x: Tensor) -> Tensor:
        """log q_flow ``(B,)`` of flow-unit frames ``(B, N, 3)`` over all 3N numbers."""
        p = next(self.flow.parameters())
        return self.flow.log_prob(x.to(p.dtype).reshape(len(x), *self._token_shape)).double()

    def flow_samples(self, n: int) -> tuple[Tensor, Tensor]:
        """``n`` reparameterised flow samples ``(n, N, 3)`` in flow units with their CoM (float64) and
        log q_flow ``(n,)`` over all 3N numbers."""
        xf, log_q_flow = self.flow.sample(n)
        return xf.reshape(n, self.n_atoms, 3).double(), log_q_flow.double()

    def cartesian_log_q(self, xf: Tensor, log_q_flow: Tensor, correction: str | None = None) -> Tensor:
        """log q ``(B,)`` of the centred frames of flow samples ``xf`` in nm: log q_flow − log h(CoM)
        − 3(N−1)·log(scale), with ``correction`` (default ``com_correction``) choosing h."""
        h = com_log_density(xf, self.com_sigma, correction or self.com_correction)
        return log_q_flow - h - self.representation.log_scale(xf)

    # ------------------------------------------------------------------ generator API
    def sample_with_grad(self, n: int) -> tuple[Tensor, Tensor]:
        xf, log_q_flow = self.flow_samples(n)
        return self.representation.inverse(xf)[0], self.cartesian_log_q(xf, log_q_flow)

    def log_prob(self, x: Tensor) -> Tensor:
        y, _ = self.representation(x.double())
        return self.cartesian_log_q(y, self._flow_log_prob(y), "gaussian")

    def draw_particles(self, n: int) -> Tensor:
        """Flow samples ``(n, N, 3)`` in nm with their CoM (SMC runs on all 3N coordinates)."""
        with torch.no_grad():
            return torch.cat([self.flow_samples(min(self.sample_batch_size, n - i))[0] * self.scale
                              for i in range(0, n, self.sample_batch_size)])

    def source_energy(self, s: Tensor) -> Tensor:
        """−log q of particles ``(B, N, 3)`` nm over all 3N coordinates (up to a constant)."""
        return -self._flow_log_prob(s / self.scale)

    def sampler_target_energy(self, s: Tensor) -> Tensor:
        """u(centred s) − log h(CoM) in kT: the extended target whose shape marginal is Boltzmann."""
        return self.energy(centred(s)) - com_log_density(s / self.scale, self.com_sigma, self.com_correction)

    def particles_to_frames(self, s: Tensor) -> Tensor:
        return centred(s)

    # ------------------------------------------------------------------ loss terms
    def augment(self, x: Tensor) -> Tensor:
        """Training frames ``(B, N, 3)`` nm → flow units: centred, randomly rotated, scaled, CoM noise."""
        x = x.double()
        if self.rotations:
            x = self.representation.augment(x)
        return add_com_noise(self.representation(x)[0], self.com_sigma)

    def term_nll(self, x: Tensor) -> Tensor:
        xf = self.augment(x)
        return -self.cartesian_log_q(xf, self._flow_log_prob(xf), "gaussian").mean()

    def term_kl(self, x: Tensor) -> Tensor:
        xf, log_q_flow = self.flow_samples(self.kl_batch_size)
        u = self.training_energy(self.representation.inverse(xf)[0])
        value = u - com_log_density(xf, self.com_sigma, self.com_correction) + log_q_flow
        ok = torch.isfinite(value)
        if self._trainer is not None:
            self.log("train/kl_nonfinite", (~ok).sum().float(), on_step=True, on_epoch=False, batch_size=len(u))
        if not ok.any():
            raise FloatingPointError("every sample of the kl batch has a non-finite energy or density")
        return value[ok].mean()
