"""Neural spline flows over internal coordinates as Lightning modules (Kim et al. 2024).

Loss terms (weights come from the config or the ``LossStages`` callback):

- ``nll``: −E_data log q(x), maximum likelihood on MD frames (Cartesian density, i.e. including
  the representation's log-det, which is constant in the parameters).
- ``w2``: squared 2-Wasserstein distance between generated and data distributions of backbone
  heavy-atom distances (``w2_atoms``: also side-chain N/O/S, or every heavy atom), estimated per atom
  pair in 1-D (sort both batches, mean squared difference of order statistics; exact for 1-D marginals
  of equal-size batches) and averaged over pairs, in nm². The joint distance-matrix W2 would need an
  assignment problem per batch; the per-pair marginals are cheap, differentiable and were enough to keep
  the backbone geometry honest.
- ``kl``: reverse KL up to a constant, E_q[u(x) + log q(x)] (``BoltzmannGenerator.term_kl``).
- ``kl_path``: the same reverse KL with the path gradient (``BoltzmannGenerator.term_kl_path``): lower
  variance near the target, the stable energy stage.
- ``fkl_is``: forward KL by importance sampling on the flow's own samples (``BoltzmannGenerator.term_fkl_is``).
- ``logvar``: variance of the log importance weights over flow samples and data frames
  (``BoltzmannGenerator.term_logvar``), the energy stage of the alanine dipeptide recipes.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor

from bg.analysis import DistanceAtoms, distance_pairs
from bg.choices import check_choices
from bg.coordinates import InternalCoordinates
from bg.flows import CartesianDensity, neural_spline_flow
from bg.flows.conditioners import AbsoluteEmbedding, GAUTokens, Precision
from bg.flows.distributions import BoundedBase, TorsionBase
from bg.flows.coupling import CouplingMasks
from bg.flows.nsf import Conditioner, NarrowTorsions
from bg.metrics import pairwise_distances
from bg.models.base import BoltzmannGenerator
from bg.systems import MolecularSystem


class SplitChannelNSF(BoltzmannGenerator):
    """Split-channel NSF over (reduced) internal coordinates with GAU conditioners; with
    ``split_channels=False, conditioner="mlp"`` the baseline NSF.

    Args:
        reduced: freeze side-chain bonds and angles at their training means (proteins); ``False``
            models every internal coordinate (alanine dipeptide, comparable with the literature).
        rigid_rings: with ``reduced``, side-chain rings (Phe, Tyr, Trp, His, Pro) are rigid at the mean of their
            most populated conformation, so that the bond closing each ring keeps its length (see
            ``bg.coordinates.internal``). Checkpoints made before this option load with ``False``, as they were.
        split_channels, conditioner, backbone_layers, sidechain_layers, bins, width, depth, attention_dim,
            absolute_position, rotary, tokens, base_bounded, base_torsion, bound_margin, narrow_torsions: the
            flow, see ``bg.flows.neural_spline_flow`` (``bound_margin``: the spline interval of a bond/angle is
            the training range widened by this fraction of it on each side; ``narrow_torsions``: ``"bounded"``
            models torsions that stay within 45° of their mean, such as dihedrals relative to a
            sibling atom, as recentred bounded coordinates, ``"circular"`` keeps every torsion on the circle;
            ``coupling_masks``: ``"shuffled"`` splits the coordinates differently in every pair of couplings).
        conditioner_precision: ``"bfloat16"`` runs the conditioners' hidden layers in bfloat16 during training
            steps (autocast; 3–6× faster matrix products on CPUs with AMX and on GPUs, slower on CPUs without
            bfloat16 units); validation, sampling and evaluation stay float32.
        compile_splines: ``torch.compile`` the couplings' splines in training steps (same results to rounding;
            the first steps compile, ~20 s on CPU; needs a C++ compiler there). Like ``conditioner_precision`` a
            training-speed option: sampling and evaluation use the plain float32 flow on any machine.
        w2_batch_size: generated samples per ``w2`` evaluation (the data batch is matched to it).
        w2_atoms: whose distances ``w2`` matches: ``backbone`` (heavy backbone atoms, the paper's), ``polar``
            (those and side-chain N, O, S: hydrogen bonds and salt bridges) or ``heavy`` (all but hydrogen). ``w2``
            is a mean over pairs, so a larger selection needs a proportionally larger weight for the same pull on
            each pair.
        kl_batch_size: samples per ``kl`` evaluation.
        **kwargs: see ``BoltzmannGenerator`` (loss weights, lr, energy settings, sampling).
    """

    loss_terms = ("nll", "w2", "kl", "kl_path", "fkl_is", "logvar", "alpha2", "nll_mcmc")
    legacy_hparams = {"rigid_rings": False}

    def __init__(self, reduced: bool = True, rigid_rings: bool = True, split_channels: bool = True, conditioner: Conditioner = "gau",
                 backbone_layers: int = 8, sidechain_layers: int = 4, bins: int = 8, width: int = 64, depth: int = 2,
                 attention_dim: int = 32, absolute_position: AbsoluteEmbedding = "sinusoidal", rotary: bool = True,
                 tokens: GAUTokens = "residue", base_bounded: BoundedBase = "truncated_normal",
                 base_torsion: TorsionBase = "uniform", bound_margin: float = 0.25,
                 narrow_torsions: NarrowTorsions = "bounded", coupling_masks: CouplingMasks = "interleaved",
                 conditioner_precision: Precision = "float32", compile_splines: bool = False,
                 w2_batch_size: int = 256, w2_atoms: DistanceAtoms = "backbone",
                 kl_batch_size: int = 256, **kwargs):
        super().__init__(**kwargs)

    def build_density(self, system: MolecularSystem) -> CartesianDensity:
        rep = InternalCoordinates(system.topology, reduced=self.hparams.reduced,
                                  rigid_rings=self.hparams.rigid_rings,
                                  frozen_bonds=system.constrained_bonds())
        kinds = rep.is_angle.long() + 2 * rep.is_torsion.long()
        # the flow's options are this module's own (declared once, in the signature above)
        options = {k: self.hparams[k] for k in list(inspect.signature(neural_spline_flow).parameters)[3:]}
        self.register_buffer("pairs", self._w2_pairs(system), persistent=False)
        return CartesianDensity(rep, neural_spline_flow(kinds, rep.residue_index, rep.is_backbone, **options))

    def use_w2_atoms(self, atoms: DistanceAtoms) -> None:
        """Match the distances of ``atoms`` in ``w2`` from now on (a built model, e.g. one continued from a
        checkpoint trained with another selection); saved with the model."""
        check_choices(type(self).__init__, {"w2_atoms": atoms}, "model.")
        self.hparams.w2_atoms = atoms
        self.pairs = self._w2_pairs(self.system)

    def _w2_pairs(self, system: MolecularSystem) -> Tensor:
        """The atom pairs ``(P, 2)`` whose distances ``w2`` matches (``w2_atoms``; checkpoints before it: backbone)."""
        return distance_pairs(system.topology, self.hparams.get("w2_atoms", "backbone")).to(self.device)

    def term_w2(self, x: Tensor) -> Tensor:
        n = min(self.hparams.w2_batch_size, len(x))
        xs, _ = self.density.rsample(n)
        gen = torch.sort(pairwise_distances(xs, self.pairs), dim=0).values
        ref = torch.sort(pairwise_distances(x[:n].double(), self.pairs), dim=0).values
        return ((gen - ref) ** 2).mean()
