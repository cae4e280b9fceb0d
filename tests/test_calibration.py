"""Calibration and ranking metrics against values computed by hand."""

from __future__ import annotations

import numpy as np

from discoalign.eval.calibration import (
    brier_score,
    expected_calibration_error,
    preference_nll,
    reliability_bins,
    spearman,
)


def test_brier_nll_by_hand():
    p = np.array([0.9, 0.6, 0.2])
    assert np.isclose(brier_score(p), (0.01 + 0.16 + 0.64) / 3)
    assert np.isclose(preference_nll(np.log(p)), -(np.log(0.9) + np.log(0.6) + np.log(0.2)) / 3)


def test_ece_by_hand():
    # confidences: 0.95 (correct), 0.92 (correct), 0.65 (correct), 0.7 (p=0.3, wrong)
    p = np.array([0.95, 0.92, 0.65, 0.3])
    # bins: (0.9,1.0]: conf mean 0.935, acc 1 -> |1-0.935|*2/4 ; (0.6,0.7]: conf 0.675, acc 0.5 -> 0.175*2/4
    expected = 0.065 * 0.5 + 0.175 * 0.5
    assert np.isclose(expected_calibration_error(p), expected)
    conf, acc, count = reliability_bins(p)
    assert count.tolist() == [0, 0, 0, 0, 0, 0, 2, 0, 0, 2]
    assert np.isclose(conf[9], 0.935) and acc[6] == 0.5


def test_ece_zero_when_calibrated():
    p = np.array([0.75, 0.75, 0.75, 0.25])
    assert np.isclose(expected_calibration_error(p), 0.0)


def test_spearman_by_hand_with_ties():
    x = np.array([1.0, 2.0, 3.0, 4.0])
    assert np.isclose(spearman(x, x**3), 1.0)
    assert np.isclose(spearman(x, -x), -1.0)
    # ranks of y with ties: [1.5, 1.5, 3, 4]; Pearson of [1,2,3,4] and that
    y = np.array([5.0, 5.0, 6.0, 9.0])
    rx = np.array([1, 2, 3, 4.0]) - 2.5
    ry = np.array([1.5, 1.5, 3, 4]) - 2.5
    assert np.isclose(spearman(x, y), (rx * ry).sum() / np.sqrt((rx**2).sum() * (ry**2).sum()))
    assert np.isnan(spearman(x, np.ones(4)))
