"""Neural spline flows over internal coordinates as Lightning modules (Kim et al. 2024).

Loss terms (weights come from the config or the ``LossStages`` callback):

- ``nll``: −E_data log q(x), maximum likelihood on MD frames (Cartesian density, i.e. including
  the representation's log-det, which is constant in the parameters).
- ``w2``: squared 2-Wasserstein distance between generated and data distributions of backbone
  heavy-atom distances, estimated per atom pair in 1-D (sort both batches, mean squared difference
  of order statistics; exact for 1-D marginals of equal-size batches) and averaged over pairs, in
  nm². The joint distance-matrix W2 would need an assignment problem per batch; the per-pair
  marginals are cheap, differentiable and were enough to keep the backbone geometry honest.
- ``kl``: reverse KL up to a constant, E_q[u(x) + log q(x)], with reparameterised samples and the
  energy cut linear-logarithmically above ``energy_cut`` kT; samples with a non-finite energy are
  dropped from the mean and counted (``train/kl_nonfinite``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from bg.analysis import backbone_pairs
from bg.coordinates import InternalCoordinates
from bg.flows import InternalFlow, neural_spline_flow
from bg.flows.conditioners import ABSOLUTE_EMBEDDINGS, TOKENS
from bg.flows.distributions import BOUNDED_BASES, TORSION_BASES
from bg.flows.nsf import CONDITIONERS
from bg.metrics import pairwise_distances
from bg.models.base import BoltzmannGenerator
from bg.sampling import Sampler
from bg.systems import MolecularSystem


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"model.{name} must be one of {', '.join(choices)}, got {value!r}")


class SplitChannelNSF(BoltzmannGenerator):
    """Split-channel NSF over (reduced) internal coordinates with GAU conditioners; with
    ``split_channels=False, conditioner="mlp"`` the baseline NSF.

    Args:
        reduced: freeze side-chain bonds and angles at their training means (proteins); ``False``
            models every internal coordinate (alanine dipeptide, comparable with the literature).
        split_channels, conditioner, backbone_layers, sidechain_layers, bins, width, depth, attention_dim,
            absolute_position, rotary, tokens, base_bounded, base_torsion: see ``bg.flows.neural_spline_flow``.
        bound_margin: the spline interval of a bond/angle is the training range widened by this
            fraction of it on each side.
        w2_batch_size: generated samples per ``w2`` evaluation (the data batch is matched to it).
        kl_batch_size: samples per ``kl`` evaluation.
        **kwargs: see ``BoltzmannGenerator`` (loss weights, lr, energy settings, sampling).
    """

    loss_terms = ("nll", "w2", "kl")

    def __init__(
        self,
        reduced: bool = True,
        split_channels: bool = True,
        conditioner: str = "gau",
        backbone_layers: int = 8,
        sidechain_layers: int = 4,
        bins: int = 8,
        width: int = 64,
        depth: int = 2,
        attention_dim: int = 32,
        absolute_position: str = "sinusoidal",
        rotary: bool = True,
        tokens: str = "residue",
        base_bounded: str = "truncated_normal",
        base_torsion: str = "uniform",
        bound_margin: float = 0.25,
        w2_batch_size: int = 256,
        kl_batch_size: int = 256,
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
        self.flow_kwargs = dict(split_channels=split_channels, conditioner=conditioner, backbone_layers=backbone_layers,
                                sidechain_layers=sidechain_layers, bins=bins, width=width, depth=depth,
                                attention_dim=attention_dim, absolute_position=absolute_position, rotary=rotary, tokens=tokens,
                                base_bounded=base_bounded, base_torsion=base_torsion)
        _check_choice("conditioner", conditioner, CONDITIONERS)
        _check_choice("base_bounded", base_bounded, BOUNDED_BASES)
        _check_choice("base_torsion", base_torsion, TORSION_BASES)
        _check_choice("absolute_position", absolute_position, ABSOLUTE_EMBEDDINGS)
        _check_choice("tokens", tokens, TOKENS)
        self.reduced, self.bound_margin = reduced, bound_margin
        self.w2_batch_size, self.kl_batch_size = w2_batch_size, kl_batch_size
        self.representation: InternalCoordinates | None = None
        self.flow: InternalFlow | None = None

    # ------------------------------------------------------------------ building
    def build_model(self, system: MolecularSystem, train_positions: Tensor | None) -> None:
        rep = InternalCoordinates(system.topology, reduced=self.reduced)
        if train_positions is not None:
            x = train_positions.double()
            if self.reduced:
                rep.fit(x)
            z = torch.cat([rep(c)[0] for c in x.split(4096)])
            lo, hi = z.min(0).values, z.max(0).values
            margin = self.bound_margin * (hi - lo) + 1e-4
            low = (lo - margin).clamp(min=1e-3)
            high = torch.where(rep.is_angle, (hi + margin).clamp(max=math.pi - 1e-3), hi + margin)
        else:  # restored from a checkpoint: the buffers are overwritten by the state dict
            low, high = torch.zeros(rep.dim, dtype=torch.float64), torch.ones(rep.dim, dtype=torch.float64)
        circ = rep.is_torsion
        low = torch.where(circ, -math.pi, low)
        high = torch.where(circ, math.pi, high)
        kinds = rep.is_angle.long() + 2 * rep.is_torsion.long()
        flow = neural_spline_flow(circ, low, high, kinds, rep.residue_index, rep.is_backbone, **self.flow_kwargs)
        if train_positions is not None:
            flow.base.fit(z)
        self.representation = rep
        self.flow = flow.to(self.device)
        self.representation.to(self.device)
        self.register_buffer("pairs", backbone_pairs(system.topology).to(self.device), persistent=False)

    # ------------------------------------------------------------------ generator API
    def sample_with_grad(self, n: int) -> tuple[Tensor, Tensor]:
        z, log_q_z = self.flow.sample(n)
        x, ld_inv = self.representation.inverse(z.double())
        return x, log_q_z.double() - ld_inv

    def log_prob(self, x: Tensor) -> Tensor:
        z, ld = self.representation(x.double())
        return self.flow.log_prob(z.to(self.dtype)).double() + ld

    # ------------------------------------------------------------------ loss terms
    def term_nll(self, x: Tensor) -> Tensor:
        return -self.log_prob(x).mean()

    def term_w2(self, x: Tensor) -> Tensor:
        n = min(self.w2_batch_size, len(x))
        xs, _ = self.sample_with_grad(n)
        gen = torch.sort(pairwise_distances(xs, self.pairs), dim=0).values
        ref = torch.sort(pairwise_distances(x[:n].double(), self.pairs), dim=0).values
        return ((gen - ref) ** 2).mean()

    def term_kl(self, x: Tensor) -> Tensor:
        xs, log_q = self.sample_with_grad(self.kl_batch_size)
        u = self.training_energy(xs)
        ok = torch.isfinite(u) & torch.isfinite(log_q)
        if self._trainer is not None:
            self.log("train/kl_nonfinite", (~ok).sum().float(), on_step=True, on_epoch=False, batch_size=len(u))
        if not ok.any():
            raise FloatingPointError("every sample of the kl batch has a non-finite energy or density")
        return (u[ok] + log_q[ok]).mean()
