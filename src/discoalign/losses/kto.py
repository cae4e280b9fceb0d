"""KTO (Ethayarajh et al. 2024, https://arxiv.org/abs/2402.01306): the loss of unpaired desirable / undesirable
completions against a reference point (docs/kto.md), as TRL 1.16's `KTOTrainer` computes it.

With `r(x, y) = log pi(y|x) - log pi_ref(y|x)` (summed over the completion's tokens) and the reference point
`z0 = max(0, mean_j [log pi(y'_j|x_j) - log pi_ref(y'_j|x_j)])`, estimated on mismatched pairs (each prompt with
another row's completion of the same batch) and detached:

    desirable   (label true):  lambda_D * (1 - sigmoid(beta (r - z0)))
    undesirable (label false): lambda_U * (1 - sigmoid(beta (z0 - r)))
    loss = mean over the batch's rows

beta = `pref_beta`, lambda_D = `kto_chosen_weight`, lambda_U = `kto_rejected_weight` (LlamaFactory's names; TRL's
`desirable_weight` / `undesirable_weight`).
"""

from __future__ import annotations

import torch


def kto_reference_point(kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """0-dim fp32 z0: the mean log-ratio of the mismatched (prompt, completion) rows, detached, before the clamp at 0
    (the trainer averages it over processes first, as TRL does, then clamps)."""
    return (kl_logps.float() - ref_kl_logps.float()).mean().detach()


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    z0: torch.Tensor,
    beta: float,
    chosen_weight: float,
    rejected_weight: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row KTO loss (module docstring) and implicit rewards.

    Args:
        policy_logps, ref_logps: (B,) summed completion log-probs under the policy and the reference.
        desirable: (B,) bool, the rows' labels.
        z0: 0-dim reference point (clamped at 0 by the caller, detached).
        beta, chosen_weight, rejected_weight: `pref_beta`, `kto_chosen_weight`, `kto_rejected_weight`.
    Returns:
        losses (B,) fp32 (the batch loss is their mean); rewards (B,) fp32 `beta * r`, detached.
    """
    logratios = policy_logps.float() - ref_logps.float()
    z0 = z0.float()
    desirable_losses = chosen_weight * (1.0 - torch.sigmoid(beta * (logratios - z0)))
    undesirable_losses = rejected_weight * (1.0 - torch.sigmoid(beta * (z0 - logratios)))
    losses = torch.where(desirable, desirable_losses, undesirable_losses)
    return losses, beta * logratios.detach()


def kto_metrics(
    policy_logps: torch.Tensor, rewards: torch.Tensor, desirable: torch.Tensor, z0: torch.Tensor
) -> dict[str, torch.Tensor]:
    """TRL's KTO metrics of one batch (0-dim fp32, detached): `kl` (z0), and `rewards/chosen`, `logps/chosen` over
    the desirable rows, `rewards/rejected`, `logps/rejected` over the undesirable ones, each only when the batch has
    such rows, `rewards/margins` (chosen minus rejected) only when it has both."""
    metrics = {"kl": z0.detach().float()}
    logps = policy_logps.detach().float()
    for name, rows in (("chosen", desirable), ("rejected", ~desirable)):
        if rows.any():
            metrics[f"rewards/{name}"] = rewards[rows].mean()
            metrics[f"logps/{name}"] = logps[rows].mean()
    if "rewards/chosen" in metrics and "rewards/rejected" in metrics:
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return metrics
