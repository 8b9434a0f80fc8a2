"""Held-out MD as the reference of the sample-quality benches (bench/tarflow.py, bench/cnf.py)."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from bg.analysis import backbone_pairs, basin_populations, phi_psi_atoms, torsions
from bg.metrics import circular_w2_1d, pairwise_distances, w2_1d
from datamodules import MDDataModule

ROOT = Path(__file__).resolve().parents[1]


def datamodule(data_args: dict) -> MDDataModule:
    """An ``MDDataModule`` from a config's ``data.init_args`` as YAML reads them (the ``md`` and
    ``replica_exchange`` sections as plain dicts, which LightningCLI would have turned into settings)."""
    from bg.systems import MDSettings
    from bg.systems.replica_exchange import ReplicaExchangeSettings

    data_args = dict(data_args)
    for key, cls in (("md", MDSettings), ("replica_exchange", ReplicaExchangeSettings)):
        if isinstance(data_args.get(key), dict):
            data_args[key] = cls(**data_args[key])
    return MDDataModule(**data_args)


def load_reference(data_config: str, model) -> tuple[MDDataModule, dict]:
    """The DataModule of ``data_config``'s ``data:`` section and the reference built from its test split
    (energies under ``model``'s target, φ/ψ atoms and angles, backbone distances) plus the val split's
    angles (``angles_val``), the other held-out block."""
    dm = datamodule(yaml.safe_load((ROOT / data_config).read_text())["data"]["init_args"])
    dm.prepare_data()
    dm.setup()
    top = model.topology
    test, val = dm.positions["test"].double(), dm.positions["val"].double()
    phi_q, psi_q = phi_psi_atoms(top)
    pairs = backbone_pairs(top)
    with torch.no_grad():
        u_test = torch.cat([model.energy(c) for c in test.split(2000)])
    ref = dict(u=u_test, phi_q=phi_q, psi_q=psi_q, pairs=pairs, d_mean=pairwise_distances(test, pairs).mean(0),
               angles=torch.cat([torsions(test, phi_q), torsions(test, psi_q)], 1),
               angles_val=torch.cat([torsions(val, phi_q), torsions(val, psi_q)], 1))
    return dm, ref


def compare(x: torch.Tensor, u: torch.Tensor, log_w: torch.Tensor | None, ref: dict) -> dict:
    """Energy W2 and mean energy (kT; energies capped at max(reference) + 20 kT), φ/ψ torsion W2 (rad, periodic, mean of φ
    and ψ) against the test and val blocks, ΔD (nm) and basin populations of (weighted) samples; with
    ``ref["u_exact"]`` also the energy W2 to those energies (``energy_w2_exact``)."""
    w = None
    if log_w is not None:
        lw = torch.where(torch.isfinite(log_w) & torch.isfinite(u), log_w, torch.full_like(log_w, -torch.inf))
        w = torch.softmax(lw, 0)
    cap = float(ref["u"].max()) + 20.0
    uc = torch.clamp(torch.where(torch.isfinite(u), u, torch.full_like(u, cap)), max=cap)
    a = torch.cat([torsions(x, ref["phi_q"]), torsions(x, ref["psi_q"])], 1)
    d = pairwise_distances(x, ref["pairs"])
    mean_d = (d * w[:, None]).sum(0) if w is not None else d.mean(0)
    out = {}
    if "u_exact" in ref:  # frames of an exact sampler of the same force field (``mala_relaxed``)
        out["energy_w2_exact"] = float(w2_1d(uc[:, None], ref["u_exact"][:, None].clamp(max=cap), w)[0])
    return dict(out, energy_w2=float(w2_1d(uc[:, None], ref["u"][:, None], w)[0]),
                mean_energy=float((uc * w).sum() if w is not None else uc.mean()),
                torsion_w2=float(circular_w2_1d(a, ref["angles"], w).mean()),
                torsion_w2_val=float(circular_w2_1d(a, ref["angles_val"], w).mean()),
                dd=float((mean_d - ref["d_mean"]).abs().mean()),
                basins=basin_populations(a[:, 0], a[:, 1], log_w))


def mala_relaxed(x: torch.Tensor, energy, steps: int, step_size: float = 2e-6, batch_size: int = 1000,
                 seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Frames ``x`` ``(F, N, 3)`` nm moved by ``steps`` Metropolis-adjusted Langevin steps (h = ``step_size`` nm²)
    that leave exp(−u) exactly invariant: MD frames relaxed this way show what an exact sampler of the force field
    reads against the MD (an integrator's bias in the fast bond vibrations shows up as an energy shift). Returns the
    frames, their energies (kT) and the acceptance rate."""
    from bg.sampling.kernels import MALA
    from bg.sampling.smc import at_target

    p, accepted = at_target(x.double(), energy, MALA(step_size), steps, batch_size,
                            torch.Generator().manual_seed(seed), progress=True)
    return p.x, p.e1, accepted / max(1, steps * len(x))
