"""The per-step metrics of the DPO family, with TRL's names: what `PairLoss.metrics` logs."""

from __future__ import annotations

import torch

from .dpo import implicit_rewards


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
