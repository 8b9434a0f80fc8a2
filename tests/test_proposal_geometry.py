"""bench/proposal_geometry.py's bond statistics against mdtraj's distances on real MD frames."""

import sys
from pathlib import Path

import mdtraj as md
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.proposal_geometry import bond_classes, spread  # noqa: E402


def test_bond_classes_and_spreads_match_mdtraj(aldp_system, aldp_frames):
    top = aldp_system.topology
    classes = bond_classes(top)
    assert sum(len(v) for v in classes.values()) == top.n_bonds == 21
    assert {"C–H", "C–C", "C–N", "C–O", "H–N"} == set(classes)  # Ace-Ala-Nme: no other bonded element pairs
    for name, pairs in classes.items():
        d = md.compute_distances(md.Trajectory(aldp_frames.astype(np.float32), top), np.array(pairs)).astype(np.float64)
        mean, sd = spread(torch.tensor(aldp_frames), pairs)
        np.testing.assert_allclose(mean, d.mean(), rtol=1e-5)
        np.testing.assert_allclose(sd, d.std(0, ddof=1).mean(), rtol=1e-3)
        assert sd < 0.01, name  # thermal bond vibrations at 300 K are a few pm
