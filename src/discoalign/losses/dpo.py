"""The DPO family of preference losses (docs/design.md §3): sigmoid, robust, IPO, hinge, DiscoDPO (probit), and
Dr. DPO's batch aggregation.

Pure functions over tensors. `beta` may be a float (`pref_beta`) or a per-pair tensor
(`beta_eff(x) = pref_beta * s(x)` from the beta head); the formulas are the same either way, so the
dynamic-beta variant of every loss is the same line of code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .variance import probit_log_likelihood, probit_z

DPO_LOSS_TYPES = ("sigmoid", "robust", "ipo", "hinge", "dr_dpo")


def implicit_rewards(policy_logps: torch.Tensor, ref_logps: torch.Tensor, beta: float | torch.Tensor) -> torch.Tensor:
    """DPO's implicit rewards ``beta (log pi(y) - log pi_ref(y))``, detached.

    Args:
        policy_logps, ref_logps: (B,) log-probs of the responses under the policy and the reference.
        beta: float, or a 0-dim or (B,) tensor.
    Returns:
        (B,) fp32.
    """
    if isinstance(beta, torch.Tensor):
        beta = beta.detach().float()
    return beta * (policy_logps.float() - ref_logps.float()).detach()


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float | torch.Tensor,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_var: torch.Tensor | None = None,
    rejected_var: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO-family loss.

    With ``d = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))`` and ``ls = label_smoothing``:

    * ``sigmoid`` (DPO, Rafailov et al. 2023, https://arxiv.org/abs/2305.18290; conservative DPO when ls > 0,
      Mitchell 2023): ``-(1 - ls) log sigmoid(beta d) - ls log sigmoid(-beta d)``
    * ``robust`` (robust DPO, Chowdhury et al. 2024, https://arxiv.org/abs/2403.00409; ls = the known label-flip
      rate): ``(-(1 - ls) log sigmoid(beta d) + ls log sigmoid(-beta d)) / (1 - 2 ls)``, an unbiased estimate of
      the clean-label DPO loss (TRL's ``robust``)
    * ``ipo`` (Azar et al. 2023, https://arxiv.org/abs/2310.12036): ``(d - 1 / (2 beta))^2``.
      The trainer passes length-averaged log-probs here, as TRL and LlamaFactory do.
    * ``hinge`` (SLiC, Zhao et al. 2023, https://arxiv.org/abs/2305.10425): ``relu(1 - beta d)``
    * ``dr_dpo`` (Dr. DPO, Wu et al. 2025): the per-pair loss is DPO's ``-log sigmoid(beta d)``; what differs is the
      batch loss, ``dr_dpo_batch_loss`` below, not the mean.
    * DiscoDPO, selected by passing ``chosen_var`` and ``rejected_var`` (only with ``sigmoid``): the probit
      (Thurstone) member of the sigmoid family, ``z = beta d / sqrt(var_w + var_l)``,
      ``-(1 - ls) log Phi(z) - ls log Phi(-z)`` with z and ``torch.special.log_ndtr`` in float64, so loss and
      gradient stay exact for very negative z. The variance-scale prior (``losses.variance``) is the trainer's.

    Args:
        policy_chosen_logps: (B,) summed log-probs of the chosen responses under the policy.
        policy_rejected_logps: (B,) same for the rejected responses.
        ref_chosen_logps: (B,) summed log-probs of the chosen responses under the reference (no gradient needed).
        ref_rejected_logps: (B,) same for the rejected responses.
        beta: float, or (B,) tensor of per-pair beta (gradients flow into it, which trains the beta head).
        loss_type: ``sigmoid`` | ``robust`` | ``ipo`` | ``hinge`` | ``dr_dpo``.
        label_smoothing: ls in [0, 0.5); used by ``sigmoid``, ``robust`` and DiscoDPO only.
        chosen_var: (B,) variances of the chosen responses from the policy's variance head, or None.
        rejected_var: (B,) variances of the rejected responses, or None.

    Returns:
        losses: (B,) fp32 per-pair loss (the batch loss is its mean).
        chosen_rewards: (B,) fp32 implicit rewards ``beta (log pi(y_w) - log pi_ref(y_w))``, detached.
        rejected_rewards: (B,) fp32 implicit rewards of the rejected responses, detached.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}")
    if (chosen_var is None) != (rejected_var is None):
        raise ValueError("DiscoDPO needs both chosen_var and rejected_var (or neither, for plain DPO)")
    disco = chosen_var is not None
    if disco and loss_type != "sigmoid":
        raise ValueError(f"DiscoDPO is the probit member of the sigmoid family; loss_type {loss_type!r} is not allowed")
    if isinstance(beta, torch.Tensor):
        beta = beta.float()

    chosen_logratios = policy_chosen_logps.float() - ref_chosen_logps.float()
    rejected_logratios = policy_rejected_logps.float() - ref_rejected_logps.float()
    d = chosen_logratios - rejected_logratios

    if disco:
        beta64 = beta.double() if isinstance(beta, torch.Tensor) else beta
        z = probit_z(beta64 * d.double(), chosen_var, rejected_var)
        losses = -probit_log_likelihood(z, label_smoothing)
    elif loss_type in ("sigmoid", "dr_dpo"):  # dr_dpo: label_smoothing is 0 (config.validate)
        logits = beta * d
        losses = -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    elif loss_type == "robust":
        logits = beta * d
        ls = label_smoothing
        losses = (-(1.0 - ls) * F.logsigmoid(logits) + ls * F.logsigmoid(-logits)) / (1.0 - 2.0 * ls)
    elif loss_type == "ipo":
        losses = (d - 1.0 / (2.0 * beta)) ** 2
    else:  # hinge
        losses = torch.relu(1.0 - beta * d)

    chosen_rewards = implicit_rewards(policy_chosen_logps, ref_chosen_logps, beta)
    rejected_rewards = implicit_rewards(policy_rejected_logps, ref_rejected_logps, beta)
    return losses, chosen_rewards, rejected_rewards


def dr_dpo_batch_loss(losses: torch.Tensor, beta_prime: float) -> torch.Tensor:
    """Dr. DPO's batch loss (Wu et al. 2025, distributionally robustified DPO): ``-beta' log mean_i exp(-l_i / beta')``.

    A KL-regularised reweighting of the batch's pairs (DRO over the pairwise distribution): pair i's weight in the
    gradient is ``softmax(-l / beta')_i``, so pairs with a large loss (confident disagreements, likely flipped labels)
    count less. As ``beta' -> inf`` it is the mean (DPO); as ``beta' -> 0`` the smallest loss. Computed in float64 as
    ``m - beta' log1p(mean_i expm1(-(l_i - m) / beta'))`` with ``m = min l``: finite for any losses, and without the
    cancellation of ``log mean exp`` near ``log 1`` that makes fp32 lose the loss at large beta'.

    Args:
        losses: (B,) per-pair losses (fp32; the kept pairs only under beta-DPO's filter).
        beta_prime: beta' > 0 (`dr_dpo_beta`).
    Returns:
        0-dim fp32.
    """
    if beta_prime <= 0:
        raise ValueError(f"Dr. DPO's beta' must be positive, got {beta_prime}")
    x = losses.double()
    m = x.min().detach()
    return (m - beta_prime * torch.log1p(torch.expm1(-(x - m) / beta_prime).mean())).float()
