"""Metrics against brute-force references and single- vs two-process (gloo) reduction."""

import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from scipy.optimize import linear_sum_assignment

from bg.metrics import (DistanceDistortion, EffectiveSampleSize, Wasserstein1D, WeightedFraction, circular_w2_1d,
                        kish_ess, w2_1d)


def test_kish_ess_formula_and_failures():
    w = torch.tensor([1.0, 2.0, 3.0, 0.5], dtype=torch.float64)
    expected = w.sum() ** 2 / (len(w) * (w**2).sum())
    torch.testing.assert_close(kish_ess(torch.log(w)), expected)
    metric = EffectiveSampleSize()
    metric.update(torch.log(w[:2]) - 5000)  # far below exp's range: log-sum-exp keeps it exact
    metric.update(torch.log(w[2:]) - 5000)
    torch.testing.assert_close(metric.compute(), expected)
    # A NaN energy is a sample of weight zero: it lowers the ESS instead of vanishing.
    with_nan = torch.cat([torch.log(w), torch.tensor([math.nan])])
    torch.testing.assert_close(kish_ess(with_nan), expected * 4 / 5)
    # every sample dropped (weight zero): ESS 0, not NaN
    assert float(kish_ess(torch.full((3,), -math.inf, dtype=torch.float64))) == 0.0


def _assignment_w2(a, b, periodic=False):
    cost = a[:, None] - b[None]
    if periodic:
        cost = np.remainder(cost + np.pi, 2 * np.pi) - np.pi
    cost = cost**2
    r, c = linear_sum_assignment(cost)
    return math.sqrt(cost[r, c].mean())


def test_w2_1d_equals_optimal_assignment():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, 64), rng.gamma(2.0, 1.0, 64)
    ours = w2_1d(torch.tensor(a)[:, None], torch.tensor(b)[:, None], m=64)
    assert abs(float(ours[0]) - _assignment_w2(a, b)) < 1e-12


def test_circular_w2_equals_optimal_periodic_assignment():
    rng = np.random.default_rng(1)
    for _ in range(5):
        a = np.remainder(rng.vonmises(2.5, 2.0, 48) + np.pi, 2 * np.pi) - np.pi
        b = np.remainder(rng.vonmises(-2.8, 1.0, 48) + np.pi, 2 * np.pi) - np.pi
        ours = circular_w2_1d(torch.tensor(a)[:, None], torch.tensor(b)[:, None], m=48)
        assert abs(float(ours[0]) - _assignment_w2(a, b, periodic=True)) < 1e-10
    # Periodic: mass at ±π is close across the boundary.
    a = torch.full((16, 1), math.pi - 0.01, dtype=torch.float64)
    b = torch.full((16, 1), -math.pi + 0.01, dtype=torch.float64)
    assert abs(float(circular_w2_1d(a, b, m=16)[0]) - 0.02) < 1e-12


def test_weighted_w2_equals_resampled_w2():
    # Integer weights = repeated samples.
    a = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)[:, None]
    counts = torch.tensor([1.0, 2.0, 1.0], dtype=torch.float64)
    rep = torch.tensor([0.0, 1.0, 1.0, 2.0], dtype=torch.float64)[:, None]
    b = torch.tensor([0.5, 0.7, 1.5, 3.0], dtype=torch.float64)[:, None]
    torch.testing.assert_close(w2_1d(a, b, counts, m=4), w2_1d(rep, b, m=4))


def test_distance_distortion_and_weighted_fraction():
    ref = torch.tensor([1.0, 2.0])
    dd = DistanceDistortion(ref)
    dd.update(torch.tensor([[1.5, 2.0], [0.5, 3.0], [math.nan, 1.0]]))
    torch.testing.assert_close(dd.compute(), torch.tensor(0.25, dtype=torch.float64))
    assert int(dd.n_skipped) == 1
    wf = WeightedFraction()
    log_w = torch.log(torch.tensor([1.0, 3.0, 4.0], dtype=torch.float64)) - 700
    wf.update(log_w, torch.tensor([True, False, True]))
    torch.testing.assert_close(wf.compute(), torch.tensor(5 / 8, dtype=torch.float64))


def _metrics_on(chunks):
    ess, w2, wf = EffectiveSampleSize(), Wasserstein1D(torch.linspace(-1, 1, 50)[:, None], weighted=True), WeightedFraction()
    for values, log_w in chunks:
        ess.update(log_w)
        w2.update(values[:, None], log_w)
        wf.update(log_w, values > 0)
    return torch.stack([ess.compute(), w2.compute(), wf.compute()])


def _worker(rank, world, port, chunks, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        out[rank] = _metrics_on(chunks[rank])
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_two_process_reduction_equals_single_process():
    torch.manual_seed(0)
    values = torch.randn(300, dtype=torch.float64)
    log_w = 3 * torch.randn(300, dtype=torch.float64) - 2000
    # Uneven ranks, one of them holding a NaN weight.
    log_w[7] = math.nan
    per_rank = [[(values[:40], log_w[:40]), (values[40:90], log_w[40:90])], [(values[90:], log_w[90:])]]
    single = _metrics_on([c for rank in per_rank for c in rank])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_worker, args=(2, port, per_rank, out), nprocs=2, join=True)
    for rank in range(2):
        torch.testing.assert_close(out[rank], single, rtol=1e-10, atol=1e-12)
