"""What a DPO-family run reports at eval: accuracy against the truth, over the whole held-out set.

Eval metrics come from the arrays that `DPOTrainer.prediction_step` returns (columns below), so they are exact over the
set, not batch averages. The per-step metrics (TRL's names) come with the objective's result
(`losses.dpo_metrics.step_metrics`).
"""

from __future__ import annotations

import numpy as np

from ...data.formats import GROUND_TRUTH_COLUMNS
from ...eval.calibration import spearman

# Columns of the (B, 5) prediction array of `DPOTrainer.prediction_step`; NaN where a value does not exist.
PREDICTION_COLUMNS = ("implicit_margin", "policy_logp_margin", "beta", "var_chosen", "var_rejected", "flip_rate")
# Columns of its (B, 3) label array.
LABEL_COLUMNS = GROUND_TRUTH_COLUMNS


def _agreement(margin: np.ndarray, truth: np.ndarray) -> float:
    """Fraction of untied pairs where sign(margin) matches sign(truth).

    Ties (margin == 0) carry no prediction and are dropped, as TRL's reward accuracy drops them; NaN when every
    pair is tied (e.g. the starting policy's implicit margin, d = 0 everywhere).
    """
    untied = margin != 0
    if not untied.any():
        return float("nan")
    return float(np.mean(np.sign(margin[untied]) == np.sign(truth[untied])))


def eval_metrics(predictions: np.ndarray, labels: np.ndarray | None) -> dict[str, float]:
    """Dataset-level eval metrics from the arrays of `prediction_step` (columns: PREDICTION_COLUMNS, LABEL_COLUMNS).

    With ground truth (`builtin:synthetic`), reports:
    * ``implicit_accuracy``: d > 0 (agreement with the possibly noisy labels);
    * ``true_pref_accuracy``: the policy's implicit reward margin d agrees with the true preference;
    * ``true_pref_logp_accuracy``: the policy's own log-prob margin ``log pi(y_c) - log pi(y_r)`` agrees with the
      truth (meaningful for the starting policy too);
    * accuracies drop tied pairs (margin exactly 0) and are NaN when all are tied (the starting policy's d);
    * with a beta head / variance head: mean beta and variance on the cleanest topics (lowest noise level) and the
      others, and their Spearman correlation with the label noise.
    """
    predictions = np.asarray(predictions, dtype=np.float64)
    missing = len(PREDICTION_COLUMNS) - predictions.shape[1]  # arrays of before the flip-rate column: NaN there
    if missing > 0:
        predictions = np.concatenate([predictions, np.full((predictions.shape[0], missing), np.nan)], axis=1)
    d, logp_margin, beta, var_c, var_r, flip = (predictions[:, i] for i in range(len(PREDICTION_COLUMNS)))
    metrics: dict[str, float] = {"implicit_accuracy": _agreement(d, np.ones_like(d))}
    has_var = not np.isnan(var_c).any()
    if not np.isnan(beta).any():
        metrics["beta_mean"] = float(beta.mean())
    if not np.isnan(flip).any():
        metrics["flip_rate_mean"] = float(flip.mean())
    if has_var:
        metrics["variance_mean"] = float(np.mean((var_c + var_r) / 2))
    if labels is None:
        return metrics
    labels = np.asarray(labels, dtype=np.float64)
    if labels.ndim != 2 or np.isnan(labels[:, :2]).any():
        return metrics
    truth = labels[:, 0] - labels[:, 1]
    metrics["true_pref_accuracy"] = _agreement(d, truth)
    metrics["true_pref_logp_accuracy"] = _agreement(logp_margin, truth)
    noise = labels[:, 2]
    if np.isnan(noise).any():
        return metrics
    clean = noise == noise.min()
    spread = {"beta": beta if not np.isnan(beta).any() else None}
    spread["variance"] = (var_c + var_r) / 2 if has_var else None
    spread["flip_rate"] = flip if not np.isnan(flip).any() else None
    for name, values in spread.items():
        if values is None:
            continue
        metrics[f"{name}_clean"] = float(values[clean].mean())
        if (~clean).any():
            metrics[f"{name}_noisy"] = float(values[~clean].mean())
            metrics[f"{name}_noise_spearman"] = spearman(values, noise)
    return metrics


def compute_metrics(eval_pred) -> dict[str, float]:
    """`transformers.Trainer` hook: eval metrics from the stacked predictions and labels."""
    labels = eval_pred.label_ids
    return eval_metrics(np.asarray(eval_pred.predictions), None if labels is None else np.asarray(labels))
