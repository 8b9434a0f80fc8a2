import mdtraj as md
import numpy as np
import torch

from bg.coordinates.geometry import bond_angles, bond_lengths, dihedrals, place_atom, wrap_angle


def test_dihedrals_match_mdtraj_on_md_frames(aldp_system, aldp_frames):
    traj = md.Trajectory(aldp_frames.astype(np.float32), aldp_system.topology)
    rng = np.random.default_rng(0)
    quads = np.array([rng.choice(22, 4, replace=False) for _ in range(50)])
    ref = md.compute_dihedrals(traj, quads, opt=False)
    x = torch.tensor(traj.xyz, dtype=torch.float64)
    mine = dihedrals(*(x[:, quads[:, i]] for i in range(4))).numpy()
    diff = np.abs(np.angle(np.exp(1j * (mine - ref))))
    assert diff.max() < 1e-5  # mdtraj computes in float32


def test_angles_match_mdtraj(aldp_system, aldp_frames):
    traj = md.Trajectory(aldp_frames.astype(np.float32), aldp_system.topology)
    trip = np.array([[4, 6, 8], [6, 8, 14], [8, 14, 16], [0, 1, 2]])
    x = torch.tensor(traj.xyz, dtype=torch.float64)
    mine = bond_angles(x[:, trip[:, 0]], x[:, trip[:, 1]], x[:, trip[:, 2]]).numpy()
    np.testing.assert_allclose(mine, md.compute_angles(traj, trip, opt=False), atol=1e-5)


def test_place_atom_inverts_bond_angle_dihedral():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(500, 4, 3, dtype=torch.float64, generator=gen)
    b = bond_lengths(x[:, 1], x[:, 0])
    a = bond_angles(x[:, 0], x[:, 1], x[:, 2])
    t = dihedrals(x[:, 0], x[:, 1], x[:, 2], x[:, 3])
    y = place_atom(x[:, 1], x[:, 2], x[:, 3], b, a, t)
    assert (y - x[:, 0]).abs().max() < 1e-10


def test_wrap_angle_range():
    phi = torch.linspace(-20, 20, 1001, dtype=torch.float64)
    w = wrap_angle(phi)
    assert w.min() >= -torch.pi and w.max() < torch.pi
    assert torch.allclose(torch.cos(w), torch.cos(phi)) and torch.allclose(torch.sin(w), torch.sin(phi), atol=1e-12)
