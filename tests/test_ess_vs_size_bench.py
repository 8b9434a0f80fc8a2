"""bench/ess_vs_size.py's reading of an ESS as a log-weight variance, its fit, and its coordinate count."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.ess_vs_size import fit_slope, free_coordinates, log_weight_variance  # noqa: E402
from bg.sampling.ess import kish_ess  # noqa: E402


@pytest.mark.parametrize("sigma", [0.5, 1.0, 1.5])
def test_log_normal_weights_read_back_their_variance(sigma):
    """Kish ESS/n of log w ~ N(0, σ²) is exp(−σ²) in expectation: the link the extrapolation rests on."""
    g = torch.Generator().manual_seed(0)
    log_w = sigma * torch.randn(2_000_000, generator=g, dtype=torch.float64)
    ess_fraction = float(kish_ess(log_w))  # already ESS / n
    assert log_weight_variance(ess_fraction) == pytest.approx(sigma**2, rel=0.05)


def test_fit_through_the_origin():
    assert fit_slope([(40, 0.8), (80, 1.6), (160, 3.2)]) == pytest.approx(0.02)
    # points on a line with an offset (slope 0.01): through the origin the slope is 0.016, not the line's
    assert fit_slope([(100, 2.0), (200, 3.0)]) == pytest.approx((100 * 2 + 200 * 3) / (100**2 + 200**2))


def test_free_coordinates_of_capped_alanine():
    """Ace-Ala-Nme, 22 atoms: 3N − 6 = 60 Cartesian degrees of freedom, less the 12 bonds to H (frozen) and, on
    the reduced representation, the CB's bond and angles and the methyls' H angles held at their means."""
    atoms, dim = free_coordinates("peptide:A")
    assert atoms == 22
    assert dim < 3 * atoms - 6 - 12
    # every alanine added brings the same coordinates: the count is linear in the chain length
    dims = [free_coordinates(f"peptide:{'A' * k}")[1] for k in (1, 2, 3)]
    assert dims[2] - dims[1] == dims[1] - dims[0] > 0


def test_power_law_fit_recovers_its_exponent():
    from bench.ess_vs_size import fit_power

    a, k = fit_power([(d, 0.002 * d**1.5) for d in (40, 80, 160)])
    assert a == pytest.approx(0.002) and k == pytest.approx(1.5)


def test_no_reports_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    from bench import ess_vs_size

    monkeypatch.setattr(sys, "argv", ["ess_vs_size.py", "--sequences", "A", "--results", str(tmp_path),
                                      "--runs", str(tmp_path), "--spread", "0"])
    with pytest.raises(SystemExit, match="no reports: run bash bench/ess_vs_size.sh first"):
        ess_vs_size.main()
    assert "A: no " in capsys.readouterr().err
