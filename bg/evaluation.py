"""One path that compares a weighted sample set with a reference (held-out MD), with or without a Trainer.

- :class:`Reference`: reference frames with what every comparison needs (energies u in kT, backbone
  heavy-atom pairs and their mean distances, φ/ψ).
- :func:`sample_metrics`: torchmetrics (reduced across DDP ranks by ``compute``) for one sample set,
  its names prefixed (``""`` for proposal samples, ``"smc_"`` for SMC particles):
  ``distance_distortion`` (ΔD, nm), ``energy_w2`` (kT; energies capped at the highest reference energy
  + ``energy_cap``, so that a few clashes read as a bounded penalty), ``torsion_w2`` (rad, periodic, φ and ψ),
  ``finite_fraction``, ``low_energy_fraction`` (≤ the highest reference energy) and, for a single-residue
  peptide, ``basin_<name>`` populations; with importance weights also ``energy_w2_reweighted``,
  ``torsion_w2_reweighted``, ``basin_<name>_reweighted``, plus ``ess`` (Kish ESS/n, samples dropped by
  the generator's checks counted as weight 0) and ``<flag>_rate`` for every boolean per-sample flag.
- :func:`sampler_metrics`: the statistics of a sampler run (``ess``, ``acceptance``, ``rejection_rate``,
  ``ancestor_fraction``: distinct proposals behind the final particles / particles).
- :func:`evaluate`: draw from a generator (optionally through a sampler) and return every value, from
  plain Python.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import mdtraj as md
import torch
from torch import Tensor
from torchmetrics import MeanMetric, Metric

from bg.analysis import BASINS, backbone_pairs, basin_index, phi_psi_atoms, torsions
from bg.metrics import DistanceDistortion, EffectiveSampleSize, Wasserstein1D, WeightedFraction, pairwise_distances
from bg.sampling import Energy, Proposal, Sampler, batched, systematic_resample


#: a prime larger than any chunk or rank index: seeds step·STREAMS_PER_STEP + index never collide
STREAMS_PER_STEP = 1_000_003


def stream_seed(seed: int, step: int, index: int) -> int:
    """The seed of random stream ``index`` (a sample chunk, or an SMC population) at training ``step``:
    distinct for distinct (step, index) under a base ``seed``; the same on every rank and in every run."""
    return seed + STREAMS_PER_STEP * step + index


@dataclass
class Reference:
    """Reference frames ``x`` ``(F, N, 3)`` nm (float64) with their energies (kT), backbone pairs, mean pair
    distances and φ/ψ (``(F, R)`` rad)."""

    x: Tensor
    energy: Tensor
    pairs: Tensor
    distance_mean: Tensor
    phi_atoms: Tensor
    psi_atoms: Tensor
    phi: Tensor
    psi: Tensor

    @classmethod
    def from_frames(cls, frames: Tensor, topology: md.Topology, energy: Energy, max_frames: int = 5000,
                    batch_size: int = 1000, project: Callable[[Tensor], Tensor] | None = None) -> "Reference":
        """At most ``max_frames`` evenly strided ``frames`` ``(F, N, 3)`` nm and their energies ``energy(x)``;
        ``project`` maps the kept frames first (e.g. a model's ``on_model_coordinates``, so that MD energies
        compare with those of samples that hold some coordinates fixed)."""
        if len(frames) == 0:
            raise ValueError("the reference has no frames")
        x = frames[::max(1, math.ceil(len(frames) / max_frames))].double()
        if project is not None:
            x = batched(project, x, batch_size).double()
        pairs = backbone_pairs(topology).to(x.device)
        phi_q, psi_q = (q.to(x.device) for q in phi_psi_atoms(topology))
        with torch.no_grad():
            u = batched(energy, x, batch_size)
        return cls(x=x, energy=u, pairs=pairs, distance_mean=pairwise_distances(x, pairs).mean(0), phi_atoms=phi_q,
                   psi_atoms=psi_q, phi=torsions(x, phi_q), psi=torsions(x, psi_q))

    def angles(self, x: Tensor) -> Tensor:
        """φ and ψ ``(B, 2R)`` of frames ``(B, N, 3)``."""
        return torch.cat([torsions(x, self.phi_atoms), torsions(x, self.psi_atoms)], 1)


def sample_metrics(ref: Reference, samples: dict[str, Tensor], energy_cap: float = 20.0,
                   prefix: str = "") -> dict[str, Metric]:
    """Updated metrics comparing ``samples`` (``x``, ``energy_kT`` and, when present, ``log_w`` and boolean flags)
    with ``ref`` (see module docstring)."""
    x, u, log_w = samples["x"], samples["energy_kT"], samples.get("log_w")
    dev = x.device
    angles, ref_angles = ref.angles(x), torch.cat([ref.phi, ref.psi], 1)
    finite = torch.isfinite(u) if log_w is None else torch.isfinite(u) & torch.isfinite(log_w)
    u_capped = torch.clamp(u, max=float(ref.energy.max()) + energy_cap)[:, None]
    m: dict[str, tuple[Metric, tuple]] = {
        "distance_distortion": (DistanceDistortion(ref.distance_mean), (pairwise_distances(x, ref.pairs),)),
        "energy_w2": (Wasserstein1D(ref.energy[:, None]), (u_capped,)),
        "torsion_w2": (Wasserstein1D(ref_angles, periodic=True), (angles,)),
        "finite_fraction": (MeanMetric(), (finite.double(),)),
        "low_energy_fraction": (MeanMetric(), ((finite & (u <= ref.energy.max())).double(),)),
    }
    if log_w is not None:
        m["ess"] = (EffectiveSampleSize(), (log_w,))
        m["energy_w2_reweighted"] = (Wasserstein1D(ref.energy[:, None], weighted=True), (u_capped, log_w))
        m["torsion_w2_reweighted"] = (Wasserstein1D(ref_angles, periodic=True, weighted=True), (angles, log_w))
        for flag, value in samples.items():
            if value.dtype == torch.bool:
                m[f"{flag}_rate"] = (MeanMetric(), (value.to(dev).double(),))
    if ref.phi.shape[1] == 1:
        basins = basin_index(angles[:, 0], angles[:, 1])
        for k, name in enumerate(BASINS):
            m[f"basin_{name}"] = (MeanMetric(), ((basins == k).double(),))
            if log_w is not None:
                m[f"basin_{name}_reweighted"] = (WeightedFraction(), (log_w, basins == k))
    out = {}
    for name, (metric, args) in m.items():
        metric = metric.to(dev)
        metric.update(*args)
        out[prefix + name] = metric
    return out


def sampler_metrics(stats: dict[str, Any], n: int, prefix: str = "smc_") -> dict[str, Metric]:
    """Metrics of a sampler run's statistics (averaged over ranks): final ESS/n, acceptance, rejection rate and
    the fraction of distinct proposals the ``n`` final particles descend from."""
    values = dict(ess=stats["ess"], acceptance=stats.get("acceptance"), rejection_rate=stats.get("rejection_rate"),
                  ancestor_fraction=stats["n_ancestors"] / n if "n_ancestors" in stats else None)
    out = {}
    for name, value in values.items():
        metric = MeanMetric()
        metric.update(torch.tensor(math.nan if value is None else value, dtype=torch.float64))
        out[prefix + name] = metric
    return out


def resampled(out: dict[str, Any], generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """Weighted samples resampled (systematically) to equal weights: ``x`` and ``energy_kT``."""
    idx = systematic_resample(torch.softmax(out["log_w"], 0), generator)
    return dict(x=out["x"][idx], energy_kT=out["energy_kT"][idx])


def compute(metrics: dict[str, Metric]) -> dict[str, float]:
    """Every metric's value (reduced across ranks under DDP)."""
    return {name: float(metric.compute()) for name, metric in metrics.items()}


def evaluate(proposal: Proposal, target: Energy, reference: Reference, n: int = 2000,
             sampler: Sampler | None = None, seed: int = 0, energy_cap: float = 20.0) -> dict[str, float]:
    """Draw ``n`` samples from ``proposal`` (a generator's ``.proposal``) and compare them with ``reference``:
    the proposal's samples with their importance weights, or with ``sampler`` (e.g. SMC) its particles
    resampled to equal weights (``smc_*`` names) and its statistics. No Trainer needed."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if sampler is None:
            return compute(sample_metrics(reference, proposal.weigh(n, target), energy_cap))
        gen = torch.Generator(device=reference.x.device).manual_seed(seed)
        out = sampler(proposal, target, n, generator=gen)
        prefix = f"{sampler.name}_"
        metrics = sample_metrics(reference, resampled(out, gen), energy_cap, prefix)
        return compute({**metrics, **sampler_metrics(out, n, prefix)})
