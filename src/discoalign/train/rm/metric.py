"""Eval metrics of a reward model: ranking, calibration, and (with ground truth) true accuracy and
the correlation between predicted spread and the true label noise."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ...eval.calibration import brier_score, expected_calibration_error, preference_nll, spearman


def preference_log_prob(
    mean_c: np.ndarray, mean_r: np.ndarray, var_c: np.ndarray | None, var_r: np.ndarray | None, disco: bool
) -> np.ndarray:
    """log P(chosen > rejected) under the model's own likelihood: sigmoid for BT, probit for Disco. (B,)."""
    diff = torch.as_tensor(mean_c - mean_r, dtype=torch.float64)
    if disco:
        z = diff / torch.sqrt(torch.as_tensor(var_c + var_r, dtype=torch.float64))
        return torch.special.log_ndtr(z).numpy()
    return F.logsigmoid(diff).numpy()


def pair_accuracy(mean_c, mean_r, truly_better=None) -> float:
    """Fraction of pairs ranked right, ties dropped (TRL's rule: a pair scored equal says nothing either way).

    `mean_c`, `mean_r`: (B,) numpy arrays or tensors. With `truly_better` ((B,) bool, the true ranking) the
    prediction `mean_c > mean_r` is compared with it instead of with "chosen wins". NaN when every pair is a tie.
    """
    mean_c, mean_r = np.asarray(mean_c, dtype=np.float64), np.asarray(mean_r, dtype=np.float64)
    decided = mean_c != mean_r
    if not decided.any():
        return float("nan")
    right = mean_c > mean_r
    if truly_better is not None:
        right = right == np.asarray(truly_better, dtype=bool)
    return float(np.mean(right[decided]))


def reward_metrics(predictions: np.ndarray, labels: np.ndarray | None, disco: bool) -> dict[str, float]:
    """Metrics from `RewardTrainer.prediction_step` outputs.

    Args:
        predictions: (B, 4) columns mean_chosen, mean_rejected, var_chosen, var_rejected (NaN if absent).
        labels: (B, 3) columns true_reward_chosen, true_reward_rejected, noise (NaN if absent), or None.
        disco: use the probit likelihood (the model was trained with `disco_pref`).
    """
    mean_c, mean_r, var_c, var_r = (predictions[:, i].astype(np.float64) for i in range(4))
    has_var = not np.isnan(var_c).any()
    log_p = preference_log_prob(mean_c, mean_r, var_c, var_r, disco and has_var)
    prob = np.exp(log_p)
    metrics = {
        "accuracy": pair_accuracy(mean_c, mean_r),
        "margin": float(np.mean(mean_c - mean_r)),
        "nll": preference_nll(log_p),
        "brier": brier_score(prob),
        "ece": expected_calibration_error(prob, num_bins=10),
    }
    if has_var:
        metrics["variance_chosen"] = float(np.mean(var_c))
        metrics["variance_rejected"] = float(np.mean(var_r))
    if labels is not None and not np.isnan(labels[:, 0]).any():
        true_c, true_r, noise = labels[:, 0], labels[:, 1], labels[:, 2]
        truly_better = true_c > true_r
        metrics["true_accuracy"] = pair_accuracy(mean_c, mean_r, truly_better)
        if has_var and not np.isnan(noise).any():
            metrics["spread_noise_spearman"] = spearman(np.sqrt(var_c + var_r), noise)
    return metrics


def make_compute_metrics(disco: bool):
    """A `compute_metrics` for `transformers.Trainer` bound to the loss family."""

    def compute_metrics(eval_pred) -> dict[str, float]:
        return reward_metrics(np.asarray(eval_pred.predictions), np.asarray(eval_pred.label_ids), disco)

    return compute_metrics
