"""bench/basin_weights.py: basin counts against mdtraj's φ/ψ, weight shares that add up, log w relative to the
most populated basin."""

import math
import sys
from pathlib import Path

import mdtraj as md
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.basin_weights import flow_rows, md_rows  # noqa: E402
from bg.analysis import BASINS  # noqa: E402
from bg.models import TarFlowGenerator  # noqa: E402


def _cells(rows):
    return {r.split("|")[1].strip(): [c.strip() for c in r.split("|")[2:-1]] for r in rows}


def test_basin_rows_against_mdtraj_and_their_sums(aldp_system, aldp_frames):
    torch.manual_seed(0)
    model = TarFlowGenerator(channels=16, blocks=2, layers=1, heads=2, representation="frame", sample_batch_size=64)
    frames = torch.as_tensor(aldp_frames)
    model.build(aldp_system, frames)
    model = model.double()

    traj = md.Trajectory(aldp_frames.astype(np.float32), aldp_system.topology)
    phi, psi = md.compute_phi(traj)[1][:, 0], md.compute_psi(traj)[1][:, 0]
    lo, hi = math.radians(-120), math.radians(50)
    alpha_r = int(((phi < 0) & (psi >= lo) & (psi < hi)).sum())
    md_cells = _cells(md_rows(model, frames.double(), batch=64))
    assert list(md_cells) == list(BASINS)
    counts = {k: int(v[0]) for k, v in md_cells.items()}
    assert sum(counts.values()) == len(frames)
    assert counts["alpha_R"] == alpha_r
    assert counts["alpha_L"] + counts["C7ax"] == int((phi > 0).sum())
    top = max(counts, key=counts.get)
    assert md_cells[top][2] in ("+0.00", "-0.00")

    flow_cells = _cells(flow_rows(model, 200, batch=64))
    assert abs(sum(float(v[0]) for v in flow_cells.values()) - 1) < 1e-3  # cells of 4 decimals
    assert abs(sum(float(v[1]) for v in flow_cells.values()) - 1) < 1e-3
