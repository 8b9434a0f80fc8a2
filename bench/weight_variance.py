"""Where does the variance of a generator's log importance weights come from?

ESS/n ≈ exp(−Var log w) for near-lognormal weights, so the spread of log w = −u − log q over the flow's
samples is what an ESS figure reads. For each checkpoint: ``--samples`` flow samples, log w with the torch
force field, its quantiles about the median, and the share of its variance (held-out R² on the second
half of the samples) that each family of features explains:

- each internal coordinate alone (a 4th-order polynomial; torsions: 3 Fourier orders) and all of them
  added up: a marginal the flow gets wrong shows here;
- φ/ψ boxes (12 × 12), for peptides: basins at the wrong weight;
- every atom pair's 1/r⁶ and 1/r (ridge regression): contacts, i.e. steric walls the flow crosses;
- the correlation of log w with each force-field term.

The samples whose log w lies more than 8 nats below the median (clashes) are left out of the regressions:
they carry no weight and would own every fit. This is how the alanine dipeptide flow's remaining spread was
traced to close contacts rather than to marginals (bench/results/aldp_weight_variance.md).

    python bench/weight_variance.py --checkpoint label=path [--checkpoint ...] --out bench/results/aldp_weight_variance.md

A transferable generator (one checkpoint, many peptides) is read once per peptide of ``--sequences``
(one-letter codes, capped as the peptide sets build them, e.g. ``--sequences G,L,N,V,Y``): which coordinates
of a peptide the model never saw carry its weight variance.
"""

from __future__ import annotations

import argparse
import math
import platform
import shlex
import sys
from pathlib import Path

import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import bg  # noqa: E402
from bg.analysis import phi_psi_atoms, torsions  # noqa: E402
from bg.energy import target_energy  # noqa: E402


def held_out_r2(features: Tensor, y: Tensor, ridge: float = 0.0) -> float:
    """R² on the second half of (features, y) of a (ridge) least-squares fit on the first half."""
    a = torch.cat([features, torch.ones(len(features), 1, dtype=features.dtype)], 1)
    h = len(a) // 2
    g = a[:h].T @ a[:h] + ridge * torch.eye(a.shape[1], dtype=a.dtype)
    coef = torch.linalg.solve(g, a[:h].T @ y[:h, None])
    res = y[h:] - (a[h:] @ coef)[:, 0]
    return 1 - float(res.var() / y[h:].var())


def coordinate_features(z: Tensor, torsion: bool) -> Tensor:
    if torsion:
        return torch.stack([f(k * z) for f in (torch.sin, torch.cos) for k in (1, 2, 3)], 1)
    s = (z - z.mean()) / z.std()
    return torch.stack([s, s**2, s**3, s**4], 1)


@torch.no_grad()
def analyse(model, n: int, seed: int, top: int) -> dict:
    torch.manual_seed(seed)
    x, log_q = model.sample(n)
    u = torch.cat([model.energy(c) for c in x.split(2000)])
    log_w = (-u - log_q).double()
    finite = torch.isfinite(log_w)
    med = log_w[finite].median()
    q = {p: float(torch.quantile(log_w[finite] - med, p)) for p in (0.01, 0.1, 0.9, 0.99)}
    w = torch.softmax(torch.where(finite, log_w, -math.inf), 0)
    out = dict(n=n, ess=float(1 / (w**2).sum() / n), quantiles=q, max=float(log_w[finite].max() - med))
    keep = finite & (log_w > med - 8)
    x, y = x[keep].double(), log_w[keep] - log_w[keep].mean()
    out.update(kept=int(keep.sum()), var=float(y.var()))

    rep = model.representation
    z = rep.forward(x)[0]
    table = rep.coordinate_table()
    per, feats = [], []
    for i, entry in enumerate(table):
        f = coordinate_features(z[:, i], entry["kind"] == "torsion")
        feats.append(f)
        per.append((held_out_r2(f, y), entry["kind"], "–".join(entry["atoms"])))
    out["coordinates"] = sorted(per, reverse=True)[:top]
    out["coordinates_sum"] = held_out_r2(torch.cat(feats, 1), y)

    try:
        phi_a, psi_a = phi_psi_atoms(model.topology)
        phi, psi = torsions(x, phi_a)[:, 0], torsions(x, psi_a)[:, 0]
        box = lambda a: ((a + math.pi) / (2 * math.pi) * 12).long().clamp(0, 11)  # noqa: E731
        out["phi_psi"] = held_out_r2(torch.nn.functional.one_hot(box(phi) * 12 + box(psi), 144).double(), y, 1e-3)
        pos = torsions(x, phi_a)[:, 0] > 0
        out["weight_phi_pos"] = float(torch.softmax(y, 0)[pos].sum())
    except (ValueError, IndexError):
        out["phi_psi"] = None

    i, j = torch.triu_indices(x.shape[1], x.shape[1], 1)
    r = (x[:, i] - x[:, j]).norm(dim=-1)
    inv6 = (r**-6 - (r**-6).mean(0)) / (r**-6).std(0)
    pairs = torch.cat([inv6, (1 / r - (1 / r).mean(0)) / (1 / r).std(0)], 1)
    out["pairs"] = max(held_out_r2(pairs, y, lam) for lam in (1.0, 10.0, 100.0))
    corr = (inv6 * (y / y.std())[:, None]).mean(0)
    names = [f"{a.residue.name}{a.residue.index + 1}:{a.name}" for a in model.topology.atoms]
    order = torch.argsort(corr.abs(), descending=True)[:top]
    out["top_pairs"] = [(f"{names[i[k]]}–{names[j[k]]}", float(corr[k]), float(r[:, k].min())) for k in order]
    terms = target_energy(model.system, backend="torch").energy_terms(x)
    out["terms"] = [(name, float(v.std()), float(torch.corrcoef(torch.stack([v.double(), y]))[0, 1]))
                    for name, v in terms.items()]
    return out


def markdown(label: str, r: dict) -> str:
    q = r["quantiles"]
    lines = [f"### {label}", "",
             f"ESS/n {r['ess']:.3f} ({r['n']} samples, torch force field). log w about its median: 1 % {q[0.01]:+.2f}, "
             f"10 % {q[0.1]:+.2f}, 90 % {q[0.9]:+.2f}, 99 % {q[0.99]:+.2f}, max {r['max']:+.2f} nats. "
             f"Regressions on the {r['kept']} samples within 8 nats below the median (Var log w = {r['var']:.3f}):", "",
             "| features | share of Var log w explained (held-out R²) |", "|---|---|",
             f"| every internal coordinate, added up | {r['coordinates_sum']:.3f} |"]
    if r["phi_psi"] is not None:
        lines.append(f"| φ/ψ boxes (12 × 12) | {r['phi_psi']:.3f} |")
    lines += [f"| atom pairs (1/r⁶ and 1/r, ridge) | {r['pairs']:.3f} |", "",
              "Single coordinates explaining most: " + "; ".join(f"{a} ({k}) {v:.3f}" for v, k, a in r["coordinates"][:6]) + ".", "",
              "Pairs whose 1/r⁶ correlates most with log w (correlation, closest approach nm): "
              + "; ".join(f"{p} {c:+.2f} ({m:.3f})" for p, c, m in r["top_pairs"][:8]) + ".", "",
              "Force-field terms (std kT, correlation with log w): "
              + "; ".join(f"{name} {s:.1f}, {c:+.2f}" for name, s, c in r["terms"]) + ".", ""]
    return "\n".join(lines)


def peptides(model, sequences: str | None) -> list[str | None]:
    """The peptides to read ``model`` on: ``[None]`` (its own molecule) for a single-molecule generator, the
    ``--sequences`` for a transferable one (which has no molecule of its own)."""
    transferable = hasattr(model, "bind")
    if sequences is None:
        if transferable:
            raise SystemExit(f"{type(model).__name__} is transferable: name the peptides to read with --sequences")
        return [None]
    if not transferable:
        raise SystemExit(f"{type(model).__name__} models one molecule: --sequences is for transferable generators")
    return [s.strip() for s in sequences.split(",") if s.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", action="append", required=True, help="label=path (repeatable)")
    ap.add_argument("--samples", type=int, default=20_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--top", type=int, default=10)
    ap.add_argument("--sequences", default=None,
                    help="comma-separated peptides to bind a transferable checkpoint to (e.g. G,L,N,V,Y)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    head = [f"# Where the variance of the log importance weights comes from", "",
            f"Machine: {platform.node()} ({torch.get_num_threads()} torch threads, no GPU), torch {torch.__version__}. "
            f"Command: `python bench/weight_variance.py {shlex.join(sys.argv[1:])}`", ""]
    parts = []
    for spec in args.checkpoint:
        label, path = spec.split("=", 1)
        model = bg.load_generator(path)
        for sequence in peptides(model, args.sequences):
            if sequence is not None:
                model.bind(sequence)
            name = label if sequence is None else f"{label}: {model.system.name}"
            parts.append(markdown(name, analyse(model, args.samples, args.seed, args.top)))
    text = "\n".join(head + parts)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
