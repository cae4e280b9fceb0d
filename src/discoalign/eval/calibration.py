"""Metrics of a pairwise preference predictor: accuracy, NLL, Brier, ECE, and Spearman correlation.

All functions take numpy arrays; `prob` is the model's P(chosen > rejected) for each pair and the label is
always "chosen wins" (1), as stored in the data.
"""

from __future__ import annotations

import numpy as np

_EPS = 1e-12


def preference_nll(log_prob: np.ndarray) -> float:
    """Mean negative log-likelihood of the label, from log P(chosen > rejected) of shape (B,)."""
    return float(-np.mean(log_prob))


def brier_score(prob: np.ndarray) -> float:
    """Mean squared error of P(chosen > rejected) against the label 1, shape (B,)."""
    return float(np.mean((1.0 - prob) ** 2))


def expected_calibration_error(prob: np.ndarray, num_bins: int = 10) -> float:
    """Top-label ECE (Guo et al., 2017) with `num_bins` equal-width confidence bins over [0, 1].

    The predicted winner is chosen when prob > 0.5; its confidence is max(prob, 1 - prob) and it is correct
    when prob > 0.5 (the stored label is always "chosen wins"). ECE = sum_b |B_b|/n * |acc_b - conf_b|.
    Confidence never falls below 0.5, so only the upper half of the bins can fill.
    """
    prob = np.asarray(prob, dtype=np.float64)
    confidence = np.maximum(prob, 1.0 - prob)
    correct = (prob > 0.5).astype(np.float64)
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    # right-closed bins, with confidence 0 falling into the first
    bin_index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, num_bins - 1)
    ece = 0.0
    for b in range(num_bins):
        in_bin = bin_index == b
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


def reliability_bins(prob: np.ndarray, num_bins: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-bin (mean confidence, accuracy, count) for a reliability diagram, bins as in the ECE. Each (num_bins,)."""
    prob = np.asarray(prob, dtype=np.float64)
    confidence = np.maximum(prob, 1.0 - prob)
    correct = (prob > 0.5).astype(np.float64)
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    bin_index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, num_bins - 1)
    conf = np.full(num_bins, np.nan)
    acc = np.full(num_bins, np.nan)
    count = np.zeros(num_bins, dtype=np.int64)
    for b in range(num_bins):
        in_bin = bin_index == b
        count[b] = int(in_bin.sum())
        if count[b]:
            conf[b] = confidence[in_bin].mean()
            acc[b] = correct[in_bin].mean()
    return conf, acc, count


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (as scipy.stats.rankdata)."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation of two (B,) arrays (Pearson on average ranks); nan if either is constant."""
    rx, ry = _average_ranks(np.asarray(x, dtype=np.float64)), _average_ranks(np.asarray(y, dtype=np.float64))
    rx -= rx.mean()
    ry -= ry.mean()
    denom = np.sqrt((rx**2).sum() * (ry**2).sum())
    return float((rx * ry).sum() / denom) if denom > _EPS else float("nan")
