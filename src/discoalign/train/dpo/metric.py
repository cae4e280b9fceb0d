"""What a DPO-family run reports: the per-step metrics of docs/design.md §3 and, at eval, accuracy against the truth.

Per-step metrics use TRL's names. Eval metrics over a whole held-out set come from the arrays that
`DPOTrainer.prediction_step` returns (columns below), so they are exact over the set, not batch averages.
"""

from __future__ import annotations

import numpy as np
import torch

from ...data.formats import GROUND_TRUTH_COLUMNS
from ...eval.calibration import spearman
from ...losses.dpo import implicit_rewards

# Columns of the (B, 5) prediction array of `DPOTrainer.prediction_step`; NaN where a value does not exist.
PREDICTION_COLUMNS = ("implicit_margin", "policy_logp_margin", "beta", "var_chosen", "var_rejected")
# Columns of its (B, 3) label array.
LABEL_COLUMNS = GROUND_TRUTH_COLUMNS


def step_metrics(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float | torch.Tensor,
    log_beta: bool,
    chosen_var: torch.Tensor | None = None,
    rejected_var: torch.Tensor | None = None,
    chosen_rewards: torch.Tensor | None = None,
    rejected_rewards: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Metrics of one batch; each value is a 0-dim fp32 tensor, detached.

    Args:
        chosen_logps, rejected_logps: (B,) summed policy log-probs of the responses.
        ref_chosen_logps, ref_rejected_logps: (B,) the same under the reference.
        beta: the beta the loss used: float ``pref_beta`` or (B,) ``beta_eff``.
        log_beta: add ``beta/*`` (the run has a beta head, or uses beta-DPO).
        chosen_var, rejected_var: (B,) variance-head outputs, or None (no variance head).
        chosen_rewards, rejected_rewards: (B,) the implicit rewards `dpo_loss` returned, or None: then computed here
            from the log-probs and beta (`losses.dpo.implicit_rewards`, the same values).

    Implicit rewards are ``beta * (log pi - log pi_ref)`` on the log-probs the loss used (summed; length-averaged
    for ``ipo``), as TRL logs them. ``rewards/accuracies`` is TRL's: a tie (d = 0) counts as wrong.
    """
    with torch.no_grad():
        batch = chosen_logps.shape[0]
        beta_t = (beta.detach().float() if isinstance(beta, torch.Tensor) else torch.full((batch,), float(beta))).to(
            chosen_logps.device
        )
        beta_t = beta_t.expand(batch)  # beta-DPO's beta is one 0-dim value per batch
        if chosen_rewards is None or rejected_rewards is None:
            chosen_rewards = implicit_rewards(chosen_logps, ref_chosen_logps, beta_t)
            rejected_rewards = implicit_rewards(rejected_logps, ref_rejected_logps, beta_t)
        metrics = {
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "logps/chosen": chosen_logps.detach().float().mean(),
            "logps/rejected": rejected_logps.detach().float().mean(),
        }
        if log_beta:
            correct = chosen_rewards > rejected_rewards  # d > 0, since beta > 0
            metrics["beta/mean"] = beta_t.mean()
            metrics["beta/min"] = beta_t.min()
            metrics["beta/max"] = beta_t.max()
            # Only reported for batches that have such pairs; the log averages over the batches that do.
            if correct.any():
                metrics["beta/mean_when_correct"] = beta_t[correct].mean()
            if (~correct).any():
                metrics["beta/mean_when_wrong"] = beta_t[~correct].mean()
        if chosen_var is not None:
            metrics["variance/chosen"] = chosen_var.detach().float().mean()
            metrics["variance/rejected"] = rejected_var.detach().float().mean()
    return metrics


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
    d, logp_margin, beta, var_c, var_r = (predictions[:, i] for i in range(len(PREDICTION_COLUMNS)))
    metrics: dict[str, float] = {"implicit_accuracy": _agreement(d, np.ones_like(d))}
    has_var = not np.isnan(var_c).any()
    if not np.isnan(beta).any():
        metrics["beta_mean"] = float(beta.mean())
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
