"""Torsion turns and the Metropolis kernel that uses them, against mdtraj's geometry and known torsion densities."""

import math

import mdtraj as md
import numpy as np
import pytest
import torch

from bg.coordinates.geometry import dihedrals, place_atom
from bg.coordinates.torsions import torsion_turns
from bg.sampling import Proposal, SMCSampler
from bg.sampling.kernels import Particles, TorsionMove
from bg.sampling.smc import evaluator
from bg.systems import get_system


@pytest.fixture(scope="module")
def aldp():
    return get_system("aldp")


def _geometry(topology: md.Topology, x: torch.Tensor):
    """Bond lengths, bond angles and proper torsions of every bonded chain (mdtraj), for frames (B, N, 3) nm."""
    traj = md.Trajectory(x.numpy(), topology)
    bonds = np.array([[a.index, b.index] for a, b in topology.bonds])
    neighbours = [set() for _ in range(topology.n_atoms)]
    for a, b in bonds:
        neighbours[a].add(b)
        neighbours[b].add(a)
    angles = np.array([[a, b, c] for b in range(topology.n_atoms) for a in neighbours[b] for c in neighbours[b] if a < c])
    torsions = np.array([[a, b, c, d] for b, c in bonds for a in neighbours[b] - {c} for d in neighbours[c] - {b, a}])
    return (md.compute_distances(traj, bonds), md.compute_angles(traj, angles),
            md.compute_dihedrals(traj, torsions), torsions)


def test_backbone_turns_change_phi_or_psi_alone(aldp):
    turns = torsion_turns(aldp.topology, "backbone")
    assert [n.split()[0] for n in turns.names] == ["phi", "psi"]
    x = torch.as_tensor(aldp.positions, dtype=torch.float64)[None].repeat(2, 1, 1)
    angle = torch.tensor([0.7, -2.1], dtype=torch.float64)
    turned = turns.turn(x, torch.tensor([0, 1]), angle)
    traj = md.Trajectory(x.numpy(), aldp.topology)
    new = md.Trajectory(turned.numpy(), aldp.topology)
    (_, phi0), (_, psi0) = md.compute_phi(traj), md.compute_psi(traj)
    (_, phi1), (_, psi1) = md.compute_phi(new), md.compute_psi(new)
    wrap = lambda a: (a + np.pi) % (2 * np.pi) - np.pi  # noqa: E731
    # frame 0 turned φ by 0.7 (the sign follows the turned side), frame 1 ψ by −2.1; the other stays
    assert abs(abs(wrap(phi1[0, 0] - phi0[0, 0])) - 0.7) < 1e-5 and abs(wrap(psi1[0, 0] - psi0[0, 0])) < 1e-5
    assert abs(abs(wrap(psi1[1, 0] - psi0[1, 0])) - 2.1) < 1e-5 and abs(wrap(phi1[1, 0] - phi0[1, 0])) < 1e-5
    bonds0, angles0, torsions0, quads = _geometry(aldp.topology, x)
    bonds1, angles1, torsions1, _ = _geometry(aldp.topology, turned)
    np.testing.assert_allclose(bonds1, bonds0, atol=1e-6)
    np.testing.assert_allclose(angles1, angles0, atol=1e-5)
    # every torsion about another bond is unchanged; those about the turned bond all change by the same angle
    axis = {0: set(turns.axes[0].tolist()), 1: set(turns.axes[1].tolist())}
    for frame in range(2):
        about = np.array([set(q[1:3].tolist()) == axis[frame] for q in quads])
        change = wrap(torsions1[frame] - torsions0[frame])
        assert np.abs(change[~about]).max() < 1e-5
        np.testing.assert_allclose(np.abs(change[about]), abs(float(angle[frame])), atol=1e-5)
        assert np.ptp(change[about]) < 1e-5


def test_rotatable_bonds_skip_peptide_bonds_rings_and_terminal_atoms(aldp):
    turns = torsion_turns(aldp.topology, "rotatable")
    atoms = list(aldp.topology.atoms)
    pairs = {frozenset((str(atoms[a]), str(atoms[b]))) for a, b in turns.axes.tolist()}
    # the three methyl rotors (ACE, Cβ, NME), φ and ψ; never a peptide bond (planar), C=O or X–H (an end
    # without another neighbour)
    assert pairs == {frozenset(p) for p in (("ACE1-CH3", "ACE1-C"), ("ALA2-N", "ALA2-CA"), ("ALA2-CA", "ALA2-C"),
                                            ("ALA2-CA", "ALA2-CB"), ("NME3-N", "NME3-C"))}
    # the side with fewer atoms turns, and neither axis atom moves
    for (a, b), moving in zip(turns.axes.tolist(), turns.moving):
        assert not moving[a] and not moving[b] and int(moving.sum()) <= aldp.topology.n_atoms // 2
    ring = md.Topology()
    chain = ring.add_chain()
    residue = ring.add_residue("RNG", chain)
    c = [ring.add_atom(f"C{i}", md.element.carbon, residue) for i in range(6)]
    for i in range(5):
        ring.add_bond(c[i], c[i + 1])
    ring.add_bond(c[0], c[4])  # a four-ring 0–1–2–3–4 with a tail 4–5: only ring bonds have two neighbours each
    with pytest.raises(ValueError, match="no rotatable torsion"):
        torsion_turns(ring, "rotatable")
    with pytest.raises(ValueError, match="try torsions: rotatable"):
        torsion_turns(ring, "backbone")


# ----------------------------------------------------------------------------------------------------------
# A four-carbon chain whose energies depend on its one torsion: the torsion's density is known in closed form
CHAIN = md.Topology()
_residue = CHAIN.add_residue("BUT", CHAIN.add_chain())
_atoms = [CHAIN.add_atom(f"C{i}", md.element.carbon, _residue) for i in range(4)]
for _i in range(3):
    CHAIN.add_bond(_atoms[_i], _atoms[_i + 1])
GRID = torch.linspace(-math.pi, math.pi, 20001, dtype=torch.float64)[:-1]


def chain_frames(phi: torch.Tensor) -> torch.Tensor:
    """Chain frames ``(B, 4, 3)`` nm (bonds 0.15 nm, angles 110°) with torsion 0–1–2–3 equal to ``phi`` ``(B,)``."""
    b, theta = len(phi), math.radians(110.0)
    x = torch.zeros(b, 4, 3, dtype=torch.float64)
    x[:, 0] = 0.15 * torch.tensor([math.cos(theta), math.sin(theta), 0.0], dtype=torch.float64)
    x[:, 2, 0] = 0.15
    full = lambda v: torch.full((b,), v, dtype=torch.float64)  # noqa: E731
    x[:, 3] = place_atom(x[:, 2], x[:, 1], x[:, 0], full(0.15), full(theta), phi)
    return x


def chain_torsion(x: torch.Tensor) -> torch.Tensor:
    return dihedrals(x[:, 0], x[:, 1], x[:, 2], x[:, 3])


def u_source(phi):  # a proposal near φ = 0 only
    return 6.0 * (1 - torch.cos(phi))


def u_target(phi):  # two basins near ±2.2 rad with a 10 kT barrier between them, unequal
    return 5.0 * (1 + torch.cos(phi)) - 2.0 * torch.cos(2 * phi) + 0.8 * torch.sin(phi)


def exact_mean(f, u):
    w = torch.softmax(-u(GRID), 0)
    return float((w * f(GRID)).sum())


def test_chain_frames_have_the_torsion_asked_for():
    phi = torch.linspace(-3.0, 3.0, 7, dtype=torch.float64)
    assert torch.allclose(chain_torsion(chain_frames(phi)), phi, atol=1e-9)


@pytest.mark.parametrize("t", [1.0, 0.4])
def test_torsion_moves_leave_the_path_density_invariant(t):
    """Started far from equilibrium (every chain at φ = 0), turns alone reach exp(−E_t)'s torsion density."""
    turns = torsion_turns(CHAIN, "rotatable")
    assert len(turns) == 1
    evaluate = evaluator(lambda x: u_source(chain_torsion(x)), lambda x: u_target(chain_torsion(x)))
    x = chain_frames(torch.zeros(4000, dtype=torch.float64))
    p = Particles(x, *evaluate(x))
    gen = torch.Generator().manual_seed(0)
    kernel = TorsionMove(turns, moves=60)
    p, accepted = kernel.step(p, t, evaluate, gen)
    assert 0 < accepted < len(x)
    # the energies were evaluated without gradients; those of moved particles were refreshed at the end
    e0, e1, g0, g1 = evaluate(p.x)
    for a, b in ((p.e0, e0), (p.e1, e1), (p.g0, g0), (p.g1, g1)):
        torch.testing.assert_close(a, b)
    phi = chain_torsion(p.x)
    u_t = lambda a: (1 - t) * u_source(a) + t * u_target(a)  # noqa: E731
    for f in (torch.cos, torch.sin, lambda a: torch.cos(2 * a)):
        assert abs(float(f(phi).mean()) - exact_mean(f, u_t)) < 0.04  # ~5 sd of 4,000 near-independent draws


class _ChainProposal(torch.nn.Module):
    """Chains with φ drawn exactly from exp(−u_source) (inverse CDF on a fine grid)."""

    reparameterized = True

    def sample(self, n, batch_size=None):
        cdf = torch.cumsum(torch.softmax(-u_source(GRID), 0), 0)
        phi = GRID[torch.searchsorted(cdf, torch.rand(n, dtype=torch.float64)).clamp(max=len(GRID) - 1)]
        x = chain_frames(phi)
        return x, self.log_prob(x)

    def log_prob(self, x):
        return -u_source(chain_torsion(x))


def test_smc_with_torsion_moves_reaches_both_basins_of_a_target_its_proposal_misses():
    torch.manual_seed(3)
    proposal = Proposal(_ChainProposal(), batch_size=2000, topology=CHAIN)
    target = lambda x: u_target(chain_torsion(x))  # noqa: E731
    kw = dict(n_steps=20, langevin_steps=1, step_size=1e-12, schedule="adaptive", torsions="rotatable")
    out = SMCSampler(torsion_moves=5, **kw)(proposal, target, 2000, generator=torch.Generator().manual_seed(1))
    w = torch.softmax(out["log_w"], 0)
    phi = chain_torsion(out["x"])
    assert 0 < out["acceptance_torsion"] < 1 and out["acceptance_data"] is not None
    for f in (torch.cos, torch.sin):
        assert abs(float((w * f(phi)).sum()) - exact_mean(f, u_target)) < 0.05
    # without the turns the same run keeps the proposal's single basin's descendants only
    stuck = SMCSampler(**kw)(proposal, target, 2000, generator=torch.Generator().manual_seed(1))
    assert stuck["n_ancestors"] < out["n_ancestors"]


def test_torsion_moves_are_refused_where_they_cannot_work(aldp):
    with pytest.raises(ValueError, match="space: data or both"):
        SMCSampler(torsion_moves=2, space="latent")
    with pytest.raises(ValueError, match="torsion_max_angle"):
        SMCSampler(torsion_moves=2, torsion_max_angle=4.0)
    with pytest.raises(ValueError, match="topology"):
        SMCSampler(torsion_moves=1, step_size=1e-12)(Proposal(_ChainProposal()), lambda x: u_target(chain_torsion(x)), 8)
    kernel = TorsionMove(torsion_turns(aldp.topology))
    z = torch.zeros(4, 66, dtype=torch.float64)
    with pytest.raises(ValueError, match="latent-space particles"):
        kernel.step(Particles(z, z[:, 0], z[:, 0]), 1.0, lambda s, grad=True: (s[:, 0], s[:, 0], None, None))
