"""`RewardObjective`: the reward-model loss for one batch of scored pairs, every term of it in one place.

    loss_i = -log sigmoid(mu_c - mu_r - m)                              (Bradley–Terry; `losses.reward`)
           | -log Phi((mu_c - mu_r - m) / sqrt(var_c + var_r))          (Disco, with `uses_variance`)
             + lambda/2 [(log var_c)^2 + (log var_r)^2]                  (the variance prior, `losses.variance`)
           | -log((1 - e) sigmoid(diff) + e sigmoid(-diff))                (flip-rate head e(x), `losses.flip`)
    loss   = mean_i loss_i + c * mean((mu_c + mu_r)^2)                  (centering, Eisenstein et al. 2023)

Shapes: every per-pair tensor (B,); `m` the optional per-row margin (Llama 2's margin loss).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .flip import MarginScale, flip_corrected_losses
from .reward import bt_reward_loss, center_rewards_penalty, disco_reward_loss, reward_difference
from .variance import log_variance_prior


@dataclass(frozen=True)
class RewardPairs:
    """One batch of B scored pairs: means (B,), the variance head's outputs (B,) when it exists, the margin (B,), the
    flip-rate head's e(x) and calibration scale (B,) when the loss uses it."""

    chosen_mean: torch.Tensor
    rejected_mean: torch.Tensor
    chosen_var: torch.Tensor | None = None
    rejected_var: torch.Tensor | None = None
    margin: torch.Tensor | None = None
    flip_rate: torch.Tensor | None = None
    flip_scale: torch.Tensor | None = None


@dataclass(frozen=True)
class RewardSettings:
    uses_variance: bool = False
    variance_prior: float = 0.0
    center_coefficient: float | None = None
    flip_rate: bool = False
    flip_prior_mean: float = 0.0
    flip_prior_strength: float = 0.0


@dataclass
class RewardLoss:
    """loss: 0-dim batch loss; losses: (B,) per-pair losses (before centering, which is a batch term); metrics: what
    to log this step (accuracy with ties dropped, margin, mean reward, and the variances when present)."""

    loss: torch.Tensor
    losses: torch.Tensor
    metrics: dict[str, torch.Tensor]


class RewardObjective:
    """The loss of the module docstring."""

    def __init__(self, settings: RewardSettings) -> None:
        self.settings = settings
        self.flip_margin_scale = MarginScale()  # the flip-rate head's running RMS of the reward margin

    def __call__(self, pairs: RewardPairs, training: bool = False) -> RewardLoss:
        s = self.settings
        mu_c, mu_r, var_c, var_r = pairs.chosen_mean, pairs.rejected_mean, pairs.chosen_var, pairs.rejected_var
        if s.uses_variance:
            losses = disco_reward_loss(mu_c, mu_r, var_c, var_r, pairs.margin)
            if s.variance_prior:
                # Anchors the variance scale (losses/variance.py); the same prior as DiscoDPO's.
                losses = (
                    losses + log_variance_prior(var_c, s.variance_prior) + log_variance_prior(var_r, s.variance_prior)
                )
        elif s.flip_rate:
            diff = reward_difference(mu_c, mu_r, pairs.margin)
            slope = pairs.flip_scale / self.flip_margin_scale(diff, training)
            losses = flip_corrected_losses(diff, pairs.flip_rate, slope, s.flip_prior_mean, s.flip_prior_strength)
        else:
            losses = bt_reward_loss(mu_c, mu_r, pairs.margin)
        loss = losses.mean()
        if s.center_coefficient:
            loss = loss + s.center_coefficient * center_rewards_penalty(mu_c, mu_r)
        return RewardLoss(loss, losses, self.metrics(pairs))

    @staticmethod
    def metrics(pairs: RewardPairs) -> dict[str, torch.Tensor]:
        mu_c, mu_r = pairs.chosen_mean, pairs.rejected_mean
        with torch.no_grad():
            metrics = {
                # ties dropped, as in eval (`train.rm.metric.pair_accuracy`); NaN if every pair is a tie
                "accuracy": (mu_c > mu_r)[mu_c != mu_r].float().mean(),
                "margin": (mu_c - mu_r).mean(),
                "mean_reward": torch.cat([mu_c, mu_r]).mean(),
            }
            if pairs.flip_rate is not None:
                metrics["flip_rate_mean"] = pairs.flip_rate.float().mean()
            if pairs.chosen_var is not None:
                metrics["variance_chosen"] = pairs.chosen_var.mean()
                metrics["variance_rejected"] = pairs.rejected_var.mean()
        return metrics
