"""GRPO / RLOO: group-relative advantages and the clipped surrogate, as pure functions over one generation batch.

A batch holds `B = n_prompts * G` completions, each prompt's `G = num_generations` completions consecutive (row
`g * G + j` is completion j of prompt g). Notation: `r_i` the sequence reward of completion i, `m_g` and `s_g` the
mean and (Bessel-corrected) standard deviation of the rewards of its group.

* GRPO (Shao et al. 2024): `A_i = (r_i - m_g) / (s_g + 1e-4)` (`scale_rewards: group`), `/ (s_batch + 1e-4)`
  (`batch`), or unscaled (`none`; Dr. GRPO, Liu et al. 2025).
* RLOO (Ahmadian et al. 2024): the baseline of completion i is the mean of the *other* G - 1 rewards,
  `A_i = r_i - (sum_g - r_i) / (G - 1) = G / (G - 1) * (r_i - m_g)`, then scaled the same way.
* Uncertainty-weighted advantages (docs/grpo.md): with a reward variance `sigma_i^2` per completion, the centred
  reward is shrunk toward the group baseline, `A_i = w_i * (r_i - b_i) / scale`, `w_i = s_g^2 / (s_g^2 + c *
  sigma_i^2)`: the posterior mean of a completion's reward under a normal prior of spread `s_g` around the group
  and a normal reward-model error of variance `sigma_i^2` (c = 1); c = 0 turns it off.

The formulas follow TRL 1.16's `GRPOTrainer._generate_and_score_completions` (advantages; `nanstd` is the unbiased
std), `RLOOTrainer` (leave-one-out baseline) and `GRPOTrainer._compute_loss` (clipped surrogate, k3 KL, the four
loss aggregations); tests/test_grpo_losses.py checks them against hand computations and TRL's lines.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .ppo import kl_per_token

ADVANTAGE_ESTIMATORS = ("grpo", "rloo")
SCALE_REWARDS = ("group", "batch", "none")
GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
STD_EPS = 1e-4  # TRL's: added to the std before dividing


def scale_rewards_mode(value: str | bool) -> str:
    """TRL's reading of `scale_rewards`: True -> "group", False -> "none", a string as it is."""
    return {True: "group", False: "none"}.get(value, value) if isinstance(value, bool) else value


@dataclass
class GroupAdvantages:
    """advantages (B,); group_std (B,) the std of each completion's group (TRL's `std_rewards` for logging);
    weights (B,) the uncertainty weights w_i (ones when off)."""

    advantages: torch.Tensor
    group_std: torch.Tensor
    weights: torch.Tensor


def group_advantages(
    rewards: torch.Tensor,
    num_generations: int,
    estimator: str = "grpo",
    scale_rewards: str | bool = "group",
    variance: torch.Tensor | None = None,
    shrinkage: float = 0.0,
    batch_std: torch.Tensor | None = None,
) -> GroupAdvantages:
    """Group-relative advantages of one batch (formulas in the module docstring).

    Args:
        rewards: (B,) fp32 sequence rewards, B a multiple of `num_generations`, groups consecutive.
        num_generations: G >= 2.
        estimator: "grpo" (group-mean baseline) or "rloo" (leave-one-out baseline).
        scale_rewards: "group" | "batch" | "none" (or TRL's True / False).
        variance: (B,) the reward's variance per completion (Disco / epistemic), for `shrinkage > 0`.
        shrinkage: c of `w_i = s_g^2 / (s_g^2 + c sigma_i^2)`; 0 disables the weighting.
        batch_std: the std of every process's rewards for `scale_rewards: batch` under distributed runs
            (TRL gathers them); None: the std of `rewards`.
    Returns:
        GroupAdvantages.
    """
    mode = scale_rewards_mode(scale_rewards)
    if mode not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS} or a bool, not {scale_rewards!r}")
    grouped = rewards.view(-1, num_generations)
    mean = grouped.mean(dim=1, keepdim=True)
    group_std = grouped.std(dim=1, keepdim=True)  # unbiased, as TRL's nanstd
    if estimator == "grpo":
        centred = grouped - mean
    elif estimator == "rloo":
        baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (num_generations - 1)
        centred = grouped - baseline
    else:
        raise ValueError(f"advantage_estimator must be one of {ADVANTAGE_ESTIMATORS}, not {estimator!r}")
    weights = torch.ones_like(grouped)
    if shrinkage > 0:
        if variance is None:
            raise ValueError("uncertainty weighting needs the reward's variance")
        spread = group_std**2
        weights = spread / (spread + shrinkage * variance.view(-1, num_generations)).clamp(min=1e-12)
    advantages = (weights * centred).reshape(-1)
    group_std = group_std.expand_as(grouped).reshape(-1)
    if mode == "group":
        advantages = advantages / (group_std + STD_EPS)
    elif mode == "batch":
        std = rewards.std() if batch_std is None else batch_std
        advantages = advantages / (std + STD_EPS)
    return GroupAdvantages(advantages, group_std, weights.reshape(-1))


@dataclass
class SurrogateTerms:
    """per_token_loss (B, L) before aggregation (padding included: mask it); kl (B, L) k3 or None (beta 0);
    low_clipped, high_clipped (B, L) bool, TRL's clip-ratio events."""

    per_token_loss: torch.Tensor
    kl: torch.Tensor | None
    low_clipped: torch.Tensor
    high_clipped: torch.Tensor


def clipped_surrogate(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    epsilon_low: float,
    epsilon_high: float,
    beta: float = 0.0,
    ref_logprobs: torch.Tensor | None = None,
) -> SurrogateTerms:
    """TRL's token-level GRPO loss before aggregation:
    `-min(ratio A, clip(ratio, 1 - eps_low, 1 + eps_high) A) + beta * kl3`, ratio = exp(logp - logp_old),
    `kl3 = exp(ref - logp) - (ref - logp) - 1` (the k3 estimator of KL(pi || pi_ref), >= 0).

    Args:
        logprobs: (B, L) current policy, with gradient; old_logprobs: (B, L) at sampling time.
        advantages: (B,) one per completion.
        mask: (B, L) 0/1 completion tokens.
        ref_logprobs: (B, L) the reference's, needed when beta != 0.
    """
    ratio = torch.exp(logprobs - old_logprobs)
    adv = advantages.unsqueeze(1)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token_loss = -torch.min(ratio * adv, clipped * adv)
    kl = None
    if beta != 0.0:
        if ref_logprobs is None:
            raise ValueError("beta != 0 needs the reference's log-probs")
        kl = kl_per_token(logprobs, ref_logprobs, mask, "k3")
        per_token_loss = per_token_loss + beta * kl
    low = (ratio < 1 - epsilon_low) & (adv < 0)
    high = (ratio > 1 + epsilon_high) & (adv > 0)
    return SurrogateTerms(per_token_loss, kl, low, high)


def aggregate_loss(
    per_token_loss: torch.Tensor,
    mask: torch.Tensor,
    loss_type: str,
    max_completion_length: int | None = None,
    num_items: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """One micro-batch's loss, as TRL aggregates it before dividing by the accumulation steps:

    * grpo: mean over completions of each completion's token mean (Shao et al. 2024);
    * bnpo: mean over the micro-batch's tokens;
    * dr_grpo: token sum / (completions x max_completion_length) (Liu et al. 2025);
    * dapo: token sum / `num_items`, the tokens per process of the whole accumulated batch (Yu et al. 2025).

    Args:
        per_token_loss, mask: (B, L).
        max_completion_length: `max_new_tokens` (dr_grpo).
        num_items: dapo's normaliser (the accumulated batch's tokens over all processes / processes).
    """
    masked = per_token_loss * mask
    if loss_type == "grpo":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return masked.sum() / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return masked.sum() / (per_token_loss.shape[0] * max_completion_length)
    if loss_type == "dapo":
        return masked.sum() / torch.as_tensor(num_items, dtype=masked.dtype).clamp(min=1.0)
    raise ValueError(f"loss_type must be one of {GRPO_LOSS_TYPES}, not {loss_type!r}")


def sequence_kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """RLOO's KL in the reward (TRL's RLOOTrainer, Ahmadian et al. 2024): the summed k1 estimate
    `sum_t (log pi - log pi_ref)` per completion, (B,), from the sampling-time log-probs."""
    return kl_per_token(logprobs, ref_logprobs, mask, "k1").sum(dim=1)
