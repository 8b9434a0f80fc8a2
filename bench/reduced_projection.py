"""What the reduced representation costs before any flow is trained: MD frames set on its manifold.

    .venv/bin/python bench/reduced_projection.py data/villin_1vii_hbonds/md [--every 20] [--out bench/results/reduced_projection.md]

A reduced flow can only sample the manifold of its frozen coordinates, so the MD frames projected onto it
(``InternalCoordinates.forward`` then ``inverse``) show what that manifold costs in energy: their OpenMM
energies against the MD's own, and how far every bond of the topology moves, the bonds that close rings (no
Z-matrix coordinate) included. It compares free ring torsions (``rigid_rings=False``, the representation before
rigid rings) with rigid rings. The frozen values are fitted on all frames; every ``--every``-th frame is judged.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import torch

from bg.coordinates import InternalCoordinates
from bg.coordinates.geometry import bond_lengths as distances
from bg.energy.factory import target_energy
from bg.systems.builtin import get_system
from bg.systems.simulate import load_md


def bond_lengths(x: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """Lengths ``(F, P)`` nm of the atom pairs ``(P, 2)`` in frames ``(F, N, 3)``."""
    return distances(x[:, pairs[:, 0]], x[:, pairs[:, 1]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("md", help="a bg MD folder (topology.pdb, system.json, chunks/)")
    parser.add_argument("--every", type=int, default=20, help="judge every this many frames")
    parser.add_argument("--out", default="bench/results/reduced_projection.md")
    args = parser.parse_args()
    start = time.time()
    system = get_system(args.md)
    top = system.topology
    atoms = list(top.atoms)
    every = torch.tensor(load_md(args.md).xyz, dtype=torch.float64)
    x = every[:: args.every]
    energy = target_energy(system, backend="openmm")
    u_md = energy(x).numpy()
    pairs = torch.tensor([(b.atom1.index, b.atom2.index) for b in top.bonds])
    md_len = bond_lengths(x, pairs)
    rows, worst = [], {}
    for rigid in (False, True):
        ic = InternalCoordinates(top, reduced=True, rigid_rings=rigid, frozen_bonds=system.constrained_bonds())
        ic.fit(every)
        xp, _ = ic.inverse(ic(x)[0])
        u = energy(xp).numpy()
        du = u - u_md
        change = (bond_lengths(xp, pairs) - md_len).abs().max(0).values
        top_bonds = torch.argsort(change, descending=True)[:5].tolist()
        worst[rigid] = [(f"{atoms[int(pairs[k, 0])]}–{atoms[int(pairs[k, 1])].name}", float(change[k]))
                        for k in top_bonds]
        q = np.quantile(u, [0.5, 0.95])
        rows.append(f"| {'rigid' if rigid else 'free'} | {ic.dim} | {q[0]:,.0f} | {q[1]:,.0f} | {u.max():,.0f} | "
                    f"{np.median(du):,.0f} | {np.mean(du > 100) * 100:.1f} % |")
    sd = (bond_lengths(every, pairs)).std(0)
    lines = [
        "# MD frames on the reduced manifold: free against rigid rings", "",
        f"Machine: {platform.node()} ({torch.get_num_threads()} threads), torch {torch.__version__}. "
        f"Date {time.strftime('%Y-%m-%d')}. {time.time() - start:.0f} s.", "",
        f"Command: `.venv/bin/python bench/reduced_projection.py {args.md} --every {args.every}`. "
        f"{len(every)} MD frames fit the frozen values; {len(x)} (every {args.every}th) are judged with OpenMM.", "",
        f"MD energies of those frames: median {np.median(u_md):,.0f} kT, 95 % {np.quantile(u_md, 0.95):,.0f}, "
        f"largest {u_md.max():,.0f}.", "",
        "| ring torsions | coordinates | median u (kT) | 95 % | largest | median u − u(MD) | frames > 100 kT above MD |",
        "|---|---|---|---|---|---|---|", *rows, "",
        "Largest change of any bond length over the judged frames (MD sd of that bond in brackets):", "",
        "| free ring torsions | rigid rings |", "|---|---|",
    ]
    index = {f"{atoms[int(a)]}–{atoms[int(b)].name}": k for k, (a, b) in enumerate(pairs.tolist())}
    for (a, da), (b, db) in zip(worst[False], worst[True]):
        lines.append(f"| {a} {da:.4f} nm ({sd[index[a]]:.4f}) | {b} {db:.4f} nm ({sd[index[b]]:.4f}) |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
