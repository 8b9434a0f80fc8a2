"""Energy check of MD frames against equipartition (bg.energy.plausibility): thermal frames of alanine dipeptide
sit about dof/2 kT above their minimum; the same frames judged at half the temperature, or with noise on the
coordinates, are flagged."""

import dataclasses

import numpy as np
import pytest

from bg.energy.plausibility import thermal_excess


def test_thermal_frames_pass_and_mismatched_ones_are_flagged(aldp_system, aldp_frames):
    check = thermal_excess(aldp_system, aldp_frames)
    assert check.dof == 60 and check.expected == 30 and 16 <= check.n_frames <= 32
    assert check.plausible and 0.7 * 30 < check.excess < 1.3 * 30, check
    assert "warning" not in check.summary("amber99sbildn")
    # u = E / kT: at 150 K the same frames lie twice as far above their minimum in kT
    cold = thermal_excess(dataclasses.replace(aldp_system, temperature=150.0), aldp_frames)
    assert not cold.plausible and cold.excess == pytest.approx(2 * check.excess, rel=0.02)
    assert "far more than thermal" in cold.summary("amber99sbildn")
    noisy = aldp_frames + np.random.default_rng(0).normal(0, 0.01, aldp_frames.shape)
    assert thermal_excess(aldp_system, noisy).excess > 5 * 30
    minimised = np.repeat(aldp_system.positions[None], 8, 0)  # frames at the minimum: no thermal energy at all
    low = thermal_excess(aldp_system, minimised)
    assert not low.plausible and "far less than thermal" in low.summary("amber99sbildn")
