"""Pairwise reward-model losses (docs/design.md §3): Bradley–Terry and Disco (probit / Thurstone).

Pure functions over per-pair tensors; the batch loss is the mean of the per-pair losses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .variance import probit_log_likelihood, probit_z


def reward_difference(
    chosen_mean: torch.Tensor, rejected_mean: torch.Tensor, margin: torch.Tensor | None = None
) -> torch.Tensor:
    """`mu_c - mu_r - m` in fp32; all (B,), margin optional (0)."""
    diff = chosen_mean.float() - rejected_mean.float()
    return diff if margin is None else diff - margin.float()


def bt_reward_loss(
    chosen_mean: torch.Tensor,
    rejected_mean: torch.Tensor,
    margin: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bradley–Terry loss, `-log sigmoid(mu_c - mu_r - m)` (Bradley & Terry, 1952; Ouyang et al., 2022).

    Args:
        chosen_mean: (B,) reward of the chosen response.
        rejected_mean: (B,) reward of the rejected response.
        margin: (B,) optional required margin `m` (Llama 2's margin loss); None means 0.
    Returns:
        (B,) fp32 per-pair losses.
    """
    return -F.logsigmoid(reward_difference(chosen_mean, rejected_mean, margin))


def disco_z(
    chosen_mean: torch.Tensor,
    rejected_mean: torch.Tensor,
    chosen_var: torch.Tensor,
    rejected_var: torch.Tensor,
    margin: torch.Tensor | None = None,
) -> torch.Tensor:
    """Probit argument `z = (mu_c - mu_r - m) / sqrt(var_c + var_r)`, so that P(chosen > rejected) = Phi(z).

    All inputs (B,); returns (B,) float64 (the loss needs it; see `losses.variance`).
    """
    return probit_z(reward_difference(chosen_mean, rejected_mean, margin), chosen_var, rejected_var)


def disco_reward_loss(
    chosen_mean: torch.Tensor,
    rejected_mean: torch.Tensor,
    chosen_var: torch.Tensor,
    rejected_var: torch.Tensor,
    margin: torch.Tensor | None = None,
) -> torch.Tensor:
    """Disco (Thurstone) loss, `-log Phi((mu_c - mu_r - m) / sqrt(var_c + var_r))`.

    The reward of each response is N(mu, var); the probability that chosen beats rejected is the probit
    `Phi(z)`. z and `torch.special.log_ndtr` run in float64, so loss and gradient stay exact for very negative z
    (about z^2/2 and z). The variance-scale prior (`losses.variance.log_variance_prior`) is added by the trainer.

    Args:
        chosen_mean, rejected_mean: (B,) means.
        chosen_var, rejected_var: (B,) variances (> 0).
        margin: (B,) optional margin.
    Returns:
        (B,) fp32 per-pair losses.
    """
    return -probit_log_likelihood(disco_z(chosen_mean, rejected_mean, chosen_var, rejected_var, margin))


def center_rewards_penalty(chosen_mean: torch.Tensor, rejected_mean: torch.Tensor) -> torch.Tensor:
    """Centering term `mean((mu_c + mu_r)^2)` (Eisenstein et al., 2023), scaled by `center_rewards_coefficient`.

    Returns a 0-dim fp32 tensor; TRL's RewardTrainer adds the same term.
    """
    return ((chosen_mean.float() + rejected_mean.float()) ** 2).mean()
