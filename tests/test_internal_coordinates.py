import math

import mdtraj as md
import numpy as np
import pytest
import torch

from bg.coordinates import InternalCoordinates, build_zmatrix, is_backbone_atom
from bg.coordinates.geometry import wrap_angle
from bg.coordinates.internal import _main_mode, _mean
from bg.coordinates.zmatrix import small_rings
from bg.systems import build_capped_peptide


def pairwise(x: torch.Tensor) -> torch.Tensor:
    # Explicit differences: torch.cdist's matrix-product form loses ~1e-8 nm far from the origin.
    return torch.linalg.vector_norm(x[:, :, None] - x[:, None], dim=-1)


@pytest.fixture(scope="module")
def all_residues():
    """ACE-<all 20 amino acids>-NME, unminimised (geometry from the builder)."""
    return build_capped_peptide("ARNDCQEGHILKMFPSTWYV", minimize=False)


def test_dimension_and_labels(aldp_system):
    ic = InternalCoordinates(aldp_system.topology)
    n = aldp_system.n_atoms
    assert ic.dim == 3 * n - 6
    assert int(ic.is_bond.sum()) == n - 1 and int(ic.is_angle.sum()) == n - 2 and int(ic.is_torsion.sum()) == n - 3
    table = ic.coordinate_table()
    cb = [r for r in table if r["atoms"][0].endswith(":CB")]
    assert cb and all(not r["backbone"] for r in cb)
    assert all(r["backbone"] for r in table if r["atoms"][0].split(":")[1] in {"N", "CA", "C", "O"})


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_round_trip_aldp_md(aldp_frames, aldp_system, dtype, tol):
    ic = InternalCoordinates(aldp_system.topology)
    x = torch.tensor(aldp_frames, dtype=dtype)
    z, _ = ic(x)
    assert z.dtype == dtype
    xr, _ = ic.inverse(z)
    assert (pairwise(xr) - pairwise(x)).abs().max() < tol


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-5), (torch.float32, 1e-4)])
def test_round_trip_villin_md(villin_md, dtype, tol):
    system, frames = villin_md
    ic = InternalCoordinates(system.topology)
    x = torch.tensor(frames, dtype=dtype)
    xr, _ = ic.inverse(ic(x)[0])
    assert (pairwise(xr) - pairwise(x)).abs().max() < tol


def test_round_trip_all_twenty_residues(all_residues):
    ic = InternalCoordinates(all_residues.topology)
    x = torch.tensor(all_residues.positions[None], dtype=torch.float64)
    x = x + 0.01 * torch.randn(4, *x.shape[1:], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    xr, _ = ic.inverse(ic(x)[0])
    assert (pairwise(xr) - pairwise(x)).abs().max() < 1e-10


def test_proline_ring_closed_through_cg_cd(all_residues):
    ic = InternalCoordinates(all_residues.topology)
    pro = next(r for r in all_residues.topology.residues if r.name == "PRO")
    n, cd = pro.atom("N").index, pro.atom("CD").index
    bonds = {tuple(sorted(r)) for r in ic.bond_idx.tolist()}
    assert (min(n, cd), max(n, cd)) not in bonds


@pytest.mark.parametrize("source", ["aldp", "peptide"])
def test_log_det_equals_autograd(source, aldp_system, aldp_frames):
    if source == "aldp":
        top, x = aldp_system.topology, torch.tensor(aldp_frames[:2], dtype=torch.float64)
    else:  # proline ring, aromatic ring, branched side chains, charged termini-free caps
        pep = build_capped_peptide("PWT", minimize=False)
        top, x = pep.topology, torch.tensor(pep.positions[None], dtype=torch.float64)
    ic = InternalCoordinates(top)
    for frame in x:
        flat = frame.reshape(-1).clone()
        jac = torch.autograd.functional.jacobian(lambda v: ic.forward_full(v.reshape(1, -1, 3))[0].reshape(-1), flat)
        sign, logabs = torch.linalg.slogdet(jac)
        _, log_det = ic.forward_full(frame[None])
        assert sign != 0
        assert abs(logabs.item() - log_det.item()) < 1e-6
        y, log_det_f = ic.forward_full(frame[None])
        xb, log_det_i = ic.inverse_full(y)
        assert abs((log_det_f + log_det_i).item()) < 1e-10
        assert (xb - frame).abs().max() < 1e-10
        # The quotient log-det differs from the square one by the orientation factor only.
        _, ld = ic(frame[None])
        assert abs((ld - log_det).item() - math.log(math.sin(y[0, 4].item()))) < 1e-10


def test_forward_inverse_log_dets_cancel(aldp_system, aldp_frames):
    ic = InternalCoordinates(aldp_system.topology)
    x = torch.tensor(aldp_frames, dtype=torch.float64)
    z, ld_f = ic(x)
    _, ld_i = ic.inverse(z)
    assert (ld_f + ld_i).abs().max() < 1e-10


def test_phi_psi_equal_mdtraj(aldp_system, aldp_frames, all_residues):
    for top, xyz in [(aldp_system.topology, aldp_frames), (all_residues.topology, all_residues.positions[None])]:
        ic = InternalCoordinates(top)
        traj = md.Trajectory(xyz.astype(np.float32), top)
        z, _ = ic(torch.tensor(traj.xyz, dtype=torch.float64))
        phi_i, psi_i = ic.phi_psi_indices()
        _, phi = md.compute_phi(traj, opt=False)
        _, psi = md.compute_psi(traj, opt=False)
        assert len(phi_i) == phi.shape[1] and len(psi_i) == psi.shape[1]
        for mine, ref in [(z[:, phi_i].numpy(), phi), (z[:, psi_i].numpy(), psi)]:
            assert np.abs(np.angle(np.exp(1j * (mine - ref)))).max() < 1e-6
        assert bool(ic.is_torsion[phi_i].all()) and bool(ic.is_backbone[psi_i].all())


def test_torsions_in_range(aldp_system, aldp_frames):
    ic = InternalCoordinates(aldp_system.topology)
    z, _ = ic(torch.tensor(aldp_frames))
    t = z[:, ic.is_torsion]
    assert t.min() >= -math.pi and t.max() <= math.pi
    a = z[:, ic.is_angle]
    assert a.min() > 0 and a.max() < math.pi


def ring_torsion_count(topology, ic: InternalCoordinates) -> int:
    """Torsions that shape a ring, counted from the Z-matrix itself: placed atom in a ring, ≥ 3 of 4 atoms there."""
    rings = small_rings(topology, ic.zmatrix)
    return sum(1 for quad in ic.torsion_idx.tolist() for ring in rings
               if quad[0] in ring and len(ring.intersection(quad)) >= 3)


def check_projection(ic: InternalCoordinates, frames: np.ndarray) -> torch.Tensor:
    """Projection of ``frames`` onto the reduced manifold: log-dets cancel, it is idempotent, free coordinates
    and backbone geometry are untouched, frozen ones sit at ``frozen_values``; returns the projected frames."""
    x = torch.tensor(frames, dtype=torch.float64)
    z, ld = ic(x)
    xp, ld_i = ic.inverse(z)
    assert (ld + ld_i).abs().max() < 1e-9
    z2, _ = ic(xp)
    assert (z2 - z).abs().max() < 1e-9
    every = ic._all_coordinates(xp)
    frozen = every[:, ~ic._free]
    gap = frozen - ic.frozen_values
    gap = torch.where(ic._frozen_torsion, wrap_angle(gap), gap)
    assert gap.abs().max() < 1e-9
    torch.testing.assert_close(every[:, ic._free], ic._all_coordinates(x)[:, ic._free], atol=1e-9, rtol=0)
    # Frozen values are part of the state dict (a checkpoint restores the same manifold).
    again = InternalCoordinates(ic.topology, reduced=True, rigid_rings=bool((ic._ring_id >= 0).any()))
    again.load_state_dict(ic.state_dict())
    assert torch.equal(again.frozen_values, ic.frozen_values)
    return xp


def check_reduced(topology, frames: np.ndarray) -> None:
    full = InternalCoordinates(topology)
    with pytest.raises(RuntimeError, match="fit"):
        InternalCoordinates(topology, reduced=True).inverse(torch.zeros(1, 10, dtype=torch.float64))
    loose = InternalCoordinates(topology, reduced=True, rigid_rings=False, reference=frames)
    ic = InternalCoordinates(topology, reduced=True, reference=frames)
    # Without rigid rings: every backbone coordinate and every torsion free, side-chain bonds and angles frozen.
    assert bool((loose.is_backbone | loose.is_torsion).all())
    sc = torch.tensor([not r["backbone"] and r["kind"] != "torsion" for r in full.coordinate_table()])
    assert full.dim - loose.dim == int(sc.sum())
    # Rigid rings freeze the torsions that shape them as well, and nothing else.
    assert loose.dim - ic.dim == ring_torsion_count(topology, ic) > 0
    for rep in (loose, ic):
        check_projection(rep, frames)


def test_reduced_representation_villin(villin_md):
    system, frames = villin_md
    check_reduced(system.topology, frames)


def test_reduced_representation_all_residues(all_residues):
    rng = np.random.default_rng(5)
    frames = all_residues.positions[None] + 0.01 * rng.standard_normal((5, all_residues.n_atoms, 3))
    check_reduced(all_residues.topology, frames)


def test_rings_found(all_residues):
    top = all_residues.topology
    rings = small_rings(top, build_zmatrix(top))
    by_residue = {}
    for ring in rings:
        (res,) = {top.atom(i).residue.name for i in ring}
        by_residue[res] = sorted(top.atom(i).name for i in ring)
    assert by_residue == {
        "PHE": ["CD1", "CD2", "CE1", "CE2", "CG", "CZ"], "TYR": ["CD1", "CD2", "CE1", "CE2", "CG", "CZ"],
        "HIS": ["CD2", "CE1", "CG", "ND1", "NE2"], "PRO": ["CA", "CB", "CD", "CG", "N"],
        "TRP": ["CD1", "CD2", "CE2", "CE3", "CG", "CH2", "CZ2", "CZ3", "NE1"],  # indole: two rings, one system
    }


def test_rigid_rings_keep_ring_closures(villin_md):
    """MD frames on the reduced manifold: with rigid rings every ring keeps its shape, so the bonds that close
    rings (no coordinate of the Z-matrix) keep their MD lengths; with free ring torsions they take the error."""
    system, frames = villin_md
    top = system.topology
    x = torch.tensor(frames, dtype=torch.float64)
    gaps = {}
    for rigid in (False, True):
        ic = InternalCoordinates(top, reduced=True, rigid_rings=rigid, reference=frames)
        xp = check_projection(ic, frames)
        tree = {frozenset(p) for p in ic.bond_idx.tolist()}
        closures = torch.tensor([(b.atom1.index, b.atom2.index) for b in top.bonds
                                 if frozenset((b.atom1.index, b.atom2.index)) not in tree])
        length = lambda y: torch.linalg.vector_norm(y[:, closures[:, 0]] - y[:, closures[:, 1]], dim=-1)  # noqa: E731
        gaps[rigid] = (length(xp) - length(x).mean(0)).abs().max()
        if rigid:
            for ring in small_rings(top, ic.zmatrix):
                atoms = sorted(ring)
                if not any(is_backbone_atom(top.atom(i)) for i in atoms):  # Pro's ring holds the free N–CA bond
                    d = pairwise(xp[:, atoms])
                    assert (d - d[:1]).abs().max() < 1e-9
    assert gaps[True] < 0.005 < gaps[False]


def test_ring_modes_and_circular_means():
    # Two pucker modes (60/40): the mean is taken over the larger one, and near ±π the mean is circular.
    rng = np.random.default_rng(0)
    modes = np.where(rng.random(500) < 0.6, 0.5, -0.5)[:, None] + 0.05 * rng.standard_normal((500, 2))
    t = torch.tensor(np.concatenate([modes, math.pi + 0.1 * rng.standard_normal((500, 1))], 1))
    t = wrap_angle(t)
    main = _main_mode(t[:, :2], 0.5)
    assert torch.equal(main, torch.tensor(modes[:, 0] > 0))
    mean = _mean(t[main], torch.tensor([True, True, True]))
    assert abs(mean[0] - 0.5) < 0.02 and abs(abs(mean[2]) - math.pi) < 0.02


def test_closure_references_only_change_proline_cd_hydrogens(all_residues):
    top = all_residues.topology
    plain, closed = build_zmatrix(top), build_zmatrix(top, closure_references=True)
    assert np.array_equal(plain.order, closed.order)
    changed = {top.atom(int(a)).name for a, p, c in zip(plain.order, plain.refs, closed.refs) if (p != c).any()}
    assert changed == {"HD2", "HD3"}
    pro = next(r for r in top.residues if r.name == "PRO")
    for a, r in zip(closed.order, closed.refs):
        if top.atom(int(a)).name in ("HD2", "HD3") and top.atom(int(a)).residue is pro:
            assert r[2] == pro.atom("N").index


def test_gradients_flow_through_inverse(aldp_system, aldp_frames):
    ic = InternalCoordinates(aldp_system.topology)
    z, _ = ic(torch.tensor(aldp_frames[:3]))
    z = z.clone().requires_grad_(True)
    torch.autograd.gradcheck(lambda v: ic.inverse(v)[0], (z,), eps=1e-6, atol=1e-5)


def test_bad_inputs(aldp_system):
    ic = InternalCoordinates(aldp_system.topology)
    with pytest.raises(ValueError, match=r"shape \(batch, 22, 3\)"):
        ic(torch.zeros(2, 21, 3))
    top = md.Topology()
    chain = top.add_chain()
    res = top.add_residue("UNK", chain)
    for i in range(4):
        top.add_atom(f"C{i}", md.element.carbon, res)
    with pytest.raises(ValueError, match="no bonds"):
        InternalCoordinates(top)
    atoms = list(top.atoms)
    top.add_bond(atoms[0], atoms[1])
    top.add_bond(atoms[1], atoms[2])
    with pytest.raises(ValueError, match="not one connected molecule"):
        InternalCoordinates(top)
