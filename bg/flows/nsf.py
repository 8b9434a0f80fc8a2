"""Neural spline flows over internal coordinates: a transform plus a base distribution.

:func:`neural_spline_flow` builds either the split-channel NSF of Kim et al. (2024) (backbone
channel first, side chains conditioned on it, GAU conditioners) or the baseline NSF (one channel,
MLP conditioners). Both are :class:`InternalFlow`\\ s (a ``bg.flows.Flow``: ``log_prob(z)``,
``sample(n) -> (z, log_q)``, reparameterised) whose ``fit(z)`` sets the spline intervals of bonds and
angles from the training range and the base statistics.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor, nn

from bg.choices import check_choices
from bg.coordinates.geometry import circular_mean, wrap_angle
from bg.flows.base import Flow
from bg.flows.conditioners import AbsoluteEmbedding, GAUConditioner, GAUTokens, MLPConditioner, Precision
from bg.flows.coupling import CouplingMasks, SplineCoupling, SplitChannelFlow
from bg.flows.distributions import BoundedBase, CoordinateBase, TorsionBase

Conditioner = Literal["gau", "mlp"]
NarrowTorsions = Literal["bounded", "circular"]
BOND, ANGLE, TORSION = 0, 1, 2


class InternalFlow(Flow):
    """q(z) = p_base(f(z)) |det ∂f/∂z| for a bijection ``transform`` (z → base space).

    ``transform`` returns ``(u, log|det ∂u/∂z|)`` and has ``inverse(u) -> (z, log|det ∂z/∂u|)``.

    Args:
        transform: the coupling stack.
        base: the base distribution.
        kinds: ``(D,)`` 0 bond, 1 angle, 2 torsion (which coordinates ``fit`` bounds, and how).
        bound_margin: ``fit`` sets the interval of a bond/angle to its training range widened by this
            fraction of it on each side (angles kept inside (0, π)).
        narrow_torsions: ``"bounded"`` (default): ``fit`` treats a torsion whose training values all lie
            within 45° of their circular mean (a dihedral relative to a sibling atom, e.g.
            H2–C–N–H1 ≈ 120° ± 5°; a planar peptide group) as a bounded coordinate: recentred on that mean
            (a shift, Jacobian 1) and modelled on its training range like an angle. A circular spline over
            the whole turn cannot make a peak that narrow (samples came out 1.1–2.3× wider than the data in
            these coordinates, which cost most of the importance weights' variance on alanine dipeptide).
            ``"circular"``: every torsion on the circle.
    """

    def __init__(self, transform: nn.Module, base: CoordinateBase, kinds: Tensor | None = None,
                 bound_margin: float = 0.25, narrow_torsions: NarrowTorsions = "bounded"):
        super().__init__()
        check_choices(InternalFlow.__init__, dict(narrow_torsions=narrow_torsions))
        self.transform = transform
        self.base = base
        kinds = kinds if kinds is not None else torch.where(base.circular, TORSION, BOND)
        self.register_buffer("kinds", kinds.long(), persistent=False)
        self.bound_margin = bound_margin
        self.narrow_torsions = narrow_torsions
        # set by fit: torsions modelled as bounded, and the circular mean they are recentred on (rad)
        self.register_buffer("recentred", torch.zeros(len(kinds), dtype=torch.bool))
        self.register_buffer("centre", torch.zeros(len(kinds), dtype=torch.float64))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints from before narrow torsions were recentred: every torsion circular, no shift
        for name in ("recentred", "centre"):
            state_dict.setdefault(prefix + name, getattr(self, name).new_zeros(getattr(self, name).shape))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _recentre(self, z: Tensor, sign: int = -1) -> Tensor:
        """Shift the recentred torsions by ``sign`` × their centre (−1: onto 0; +1: back)."""
        if not self.recentred.any():
            return z
        return torch.where(self.recentred, wrap_angle(z + sign * self.centre.to(z.dtype)), z)

    @torch.no_grad()
    def fit(self, z: Tensor) -> "InternalFlow":
        """Spline intervals of bonds (nm) and angles (rad) from the range of training data ``z`` ``(F, D)``,
        then the base statistics."""
        torsion = self.kinds == TORSION
        centre = circular_mean(z)
        narrow = torsion & (wrap_angle(z - centre).abs().max(0).values < math.pi / 4)
        if self.narrow_torsions == "circular":
            narrow = torch.zeros_like(narrow)
        self._set_recentred(narrow, centre)
        z = self._recentre(z)
        lo, hi = z.min(0).values, z.max(0).values
        margin = self.bound_margin * (hi - lo) + 1e-4
        self._set_intervals(lo - margin, hi + margin)
        self.base.fit(z)
        return self

    @torch.no_grad()
    def fit_geometry(self, centre: Tensor, sigma: Tensor, rotatable: Tensor, width: float = 8.0) -> "InternalFlow":
        """Intervals and base from a molecule's harmonic geometry instead of data (``bg.coordinates.harmonic``):
        every coordinate but the ``rotatable`` torsions ``(D,)`` lives on ``centre`` ± ``width`` ``sigma``
        (non-rotatable torsions recentred on ``centre``), with a normal base of that centre and σ truncated to
        it; rotatable torsions stay on the circle."""
        torsion = self.kinds == TORSION
        narrow = torsion & ~rotatable.to(torsion.device)
        self._set_recentred(narrow, centre)
        centre = torch.where(narrow, 0.0, centre.to(self.centre))
        half = width * sigma.to(self.centre).nan_to_num(0.0)
        self._set_intervals(centre - half, centre + half)
        self.base.loc.copy_(torch.where(self.base.circular, 0.0, centre))
        self.base.scale.copy_(torch.where(self.base.circular, 1e-3, sigma.to(self.centre).nan_to_num(1.0)))
        return self

    def _set_recentred(self, narrow: Tensor, centre: Tensor) -> None:
        self.recentred.copy_(narrow)
        self.centre.copy_(torch.where(narrow, centre.to(self.centre), 0.0))

    def _set_intervals(self, low: Tensor, high: Tensor) -> None:
        """Intervals of the bounded coordinates, clipped: bonds positive, angles inside (0, π), recentred
        torsions inside [−π, π]; circular torsions get [−π, π]."""
        torsion, narrow = self.kinds == TORSION, self.recentred
        angle, circular = self.kinds == ANGLE, torsion & ~narrow
        floor = torch.where(narrow, -math.pi, 1e-3)
        ceiling = torch.where(angle, math.pi - 1e-3, torch.where(narrow, math.pi, math.inf))
        low = torch.where(circular, -math.pi, torch.maximum(low, floor.to(low.dtype)))
        high = torch.where(circular, math.pi, torch.minimum(high, ceiling.to(high.dtype)))
        for module in [self.base, *(m for m in self.modules() if isinstance(m, SplineCoupling))]:
            module.low.copy_(low)
            module.high.copy_(high)
            module.circular.copy_(circular)

    def log_prob(self, z: Tensor, context: Any = None) -> Tensor:
        """``(B, D)`` → ``(B,)`` log density of the internal coordinates."""
        u, ld = self.transform(self._recentre(z.to(self.dtype)))
        return self.base.log_prob(u) + ld

    def sample(self, n: int, context: Any = None) -> tuple[Tensor, Tensor]:
        """``n`` samples ``(n, D)`` and their log density ``(n,)``."""
        u = self.base.sample(n, dtype=self.dtype)
        z, ld = self.transform.inverse(u)
        return self._recentre(z, sign=1), self.base.log_prob(u) - ld

    # The latent space (samplers move there, ``bg.sampling.proposal``): standardised base points e, u = loc + s·e with
    # s the base's spread per coordinate (a bond's σ is ~1e-3 of a torsion's, so unscaled base units would leave one
    # Langevin step size for all of them), y = transform⁻¹(u). Particles may leave the base's support as they move:
    # circular coordinates are read modulo 2π (both densities are periodic in them, so a chain on the real line
    # marginalises to the right one on the circle), and a bounded coordinate outside its interval has base density 0
    # (log −inf: a Metropolis move there is rejected).
    def _latent_scale(self) -> Tensor:
        """s ``(D,)``: the truncated normal's σ, a uniform interval's width / √12, 1/√κ of a von Mises (at most
        1), 1 for a uniform torsion."""
        base = self.base
        bounded = base.scale if base.bounded == "truncated_normal" else (base.high - base.low) / math.sqrt(12)
        circular = base.scale.clamp(min=1.0).rsqrt() if base.torsion == "von_mises" else torch.ones_like(base.scale)
        return torch.where(base.circular, circular, bounded)

    def _from_standard(self, e: Tensor) -> tuple[Tensor, Tensor]:
        """Base points u = loc + s·e ``(B, D)`` (circular ones wrapped) and log|det ∂u/∂e| = Σ log s."""
        s = self._latent_scale().to(e.dtype)
        u = self.base.loc.to(e.dtype) + s * e
        return torch.where(self.base.circular, wrap_angle(u), u), s.log().sum()

    def sample_latent(self, n: int) -> Tensor:
        """``n`` draws ``(n, D)`` of the standardised base density."""
        return (self.base.sample(n, dtype=torch.float64) - self.base.loc) / self._latent_scale()

    def latent_log_prob(self, e: Tensor) -> Tensor:
        """log density ``(B,)`` of the standardised base at latent points ``e`` ``(B, D)`` (−inf outside a bounded
        coordinate's interval)."""
        u, log_scale = self._from_standard(e)
        outside = ~self.base.circular & ((u < self.base.low.to(u.dtype)) | (u > self.base.high.to(u.dtype)))
        return (self.base.log_prob(u) + log_scale).masked_fill(outside.any(-1), -math.inf)

    def from_latent(self, e: Tensor) -> tuple[Tensor, Tensor]:
        """Latent ``e`` ``(B, D)`` → internal coordinates ``(B, D)`` and log|det ∂z/∂e| ``(B,)``, differentiable."""
        u, log_scale = self._from_standard(e)
        z, ld = self.transform.inverse(u.to(self.dtype))
        return self._recentre(z, sign=1), ld + log_scale.to(ld.dtype)


def neural_spline_flow(
    kinds: Tensor,
    residues: Tensor,
    backbone: Tensor,
    split_channels: bool = True,
    conditioner: Conditioner = "gau",
    backbone_layers: int = 8,
    sidechain_layers: int = 4,
    bins: int = 8,
    width: int = 64,
    depth: int = 2,
    attention_dim: int = 32,
    absolute_position: AbsoluteEmbedding = "sinusoidal",
    rotary: bool = True,
    tokens: GAUTokens = "residue",
    base_bounded: BoundedBase = "truncated_normal",
    base_torsion: TorsionBase = "uniform",
    bound_margin: float = 0.25,
    narrow_torsions: NarrowTorsions = "bounded",
    coupling_masks: CouplingMasks = "interleaved",
    conditioner_precision: Precision = "float32",
    compile_splines: bool = False,
) -> InternalFlow:
    """Build an NSF over ``D`` internal coordinates (call ``fit`` with training data before use).

    Args:
        kinds: ``(D,)`` 0 bond, 1 angle, 2 torsion (token type for GAU conditioners; torsions are circular).
        residues: ``(D,)`` residue index (positions for GAU conditioners).
        backbone: ``(D,)`` True for backbone coordinates.
        split_channels: two channels (backbone, then side chains conditioned on the backbone); ``False``
            puts every coordinate in one channel with ``backbone_layers`` couplings (baseline).
        conditioner: ``"gau"`` (gated attention units) or ``"mlp"``.
        backbone_layers, sidechain_layers: couplings per channel.
        bins: spline bins. width, depth, attention_dim: conditioner size (MLP: hidden width and
            residual blocks).
        absolute_position, rotary: positional embeddings of the GAU conditioner.
        tokens: GAU tokens, ``"residue"`` (default, O(R²) attention) or ``"coordinate"``.
        base_bounded, base_torsion: base distribution families (see ``CoordinateBase``).
        bound_margin, narrow_torsions: see :class:`InternalFlow`.
        coupling_masks: how couplings split a channel, ``masks`` of :class:`SplitChannelFlow`.
        conditioner_precision: ``"bfloat16"``: the conditioners' hidden layers in bfloat16 while training
            (``precision`` of the conditioners; sampling and evaluation stay float32).
        compile_splines: ``torch.compile`` the spline of every coupling in training mode (:class:`SplineCoupling`).
    """
    check_choices(neural_spline_flow, dict(conditioner=conditioner))
    d = len(kinds)
    circular = kinds == TORSION
    # placeholder intervals until fit() (or a state dict) sets them
    low = torch.where(circular, -math.pi, torch.zeros(d, dtype=torch.float64))
    high = torch.where(circular, math.pi, torch.ones(d, dtype=torch.float64))

    def make(n_params: int, slot: int) -> nn.Module:
        if conditioner == "mlp":
            return MLPConditioner(d, n_params, hidden=width, depth=depth, precision=conditioner_precision)
        return GAUConditioner(kinds, residues, n_params, width=width, depth=depth, attention_dim=attention_dim,
                              absolute=absolute_position, rotary=rotary, tokens=tokens, precision=conditioner_precision)

    channels = backbone.bool() if split_channels else torch.ones(d, dtype=torch.bool)
    transform = SplitChannelFlow(channels, circular, low, high, make, backbone_layers=backbone_layers,
                                 sidechain_layers=sidechain_layers if split_channels else 0, bins=bins,
                                 masks=coupling_masks, compile_splines=compile_splines)
    base = CoordinateBase(circular, low, high, bounded=base_bounded, torsion=base_torsion)
    return InternalFlow(transform, base, kinds, bound_margin, narrow_torsions)
