"""What one PPO step reports about its rollout (TRL's names where TRL has one).

| key | meaning |
|---|---|
| `objective/kl` | mean over responses of the summed per-token KL estimate against the reference |
| `objective/entropy` | mean over responses of the summed `-log pi` of the sampled tokens |
| `objective/non_score_reward` | mean of the summed `-kl_coef(x) * kl_t` |
| `objective/scores` | mean sequence reward PPO maximises (after risk adjustment, clipping, EOS penalty) |
| `objective/rlhf_reward` | `scores + non_score_reward` |
| `objective/true_reward` | builtin:synthetic prompts only: mean true reward of the responses |
| `reward/mean`, `reward/variance` | the reward model's mean (and total variance: Disco aleatoric + epistemic) |
| `reward/mean_variance_corr` | Pearson correlation of the two across the batch (Disco) |
| `response/length`, `response/eos_fraction` | tokens per response; fraction that stopped on EOS |
| `beta/mean`, `beta/min`, `beta/max` | the KL coefficient per prompt: `pref_beta`, or `pref_beta * s(x)` |
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ...data.synthetic import true_reward
from .rollout import Rollout


def pearson(x: torch.Tensor, y: torch.Tensor) -> float | None:
    """Pearson correlation of two (B,) tensors; None when either is constant (undefined)."""
    x, y = x.double(), y.double()
    x, y = x - x.mean(), y - y.mean()
    denominator = torch.sqrt((x * x).sum() * (y * y).sum())
    if denominator <= 0 or not torch.isfinite(denominator):
        return None
    return float((x * y).sum() / denominator)


def rollout_metrics(rollout: Rollout, true_rewards: list[float] | None = None) -> dict[str, float]:
    """The per-step rollout statistics of the table above, as floats."""
    mask = rollout.response_mask
    sequence_kl = rollout.kl.sum(dim=1)
    non_score = -(rollout.kl_coef.unsqueeze(1) * rollout.kl).sum(dim=1)
    metrics = {
        "objective/kl": sequence_kl.mean(),
        "objective/entropy": (-rollout.logprobs * mask).sum(dim=1).mean(),
        "objective/non_score_reward": non_score.mean(),
        "objective/scores": rollout.scores.mean(),
        "objective/rlhf_reward": (rollout.scores + non_score).mean(),
        "response/length": mask.sum(dim=1).mean(),
        "response/eos_fraction": rollout.ended.float().mean(),
        "beta/mean": rollout.kl_coef.mean(),
        "beta/min": rollout.kl_coef.min(),
        "beta/max": rollout.kl_coef.max(),
    }
    if rollout.reward_mean is not None:
        metrics["reward/mean"] = rollout.reward_mean.mean()
    if rollout.reward_variance is not None:
        metrics["reward/variance"] = rollout.reward_variance.mean()
        corr = pearson(rollout.reward_mean, rollout.reward_variance)
        if corr is not None:
            metrics["reward/mean_variance_corr"] = corr
    if true_rewards is not None:
        metrics["objective/true_reward"] = sum(true_rewards) / len(true_rewards)
    return {k: float(v) for k, v in metrics.items()}


def synthetic_true_reward() -> Callable[[str], float]:
    """`discoalign.data.synthetic.true_reward`: the known reward of a response text on builtin:synthetic."""

    return true_reward
