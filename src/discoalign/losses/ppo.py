"""PPO losses and the tensor algebra around them: pure functions over (B, L) per-token tensors.

Notation, per response token t of row b (L = longest response of the batch):
* `mask[b, t]` is 1 on the tokens of the response (up to and including its EOS), 0 on padding;
* `logprobs`, `ref_logprobs`: log pi(y_t | x, y_<t) of the sampling policy and of the frozen reference;
* `values[b, t] = V(x, y_<t)`: the critic's estimate *before* token t is generated;
* `rewards[b, t]`: the per-token reward, `-kl_coef(x) * kl_t` everywhere plus the reward model's score on the
  last response token.

Every function treats masked positions as absent: they contribute nothing to sums, means or the GAE recursion.
The conventions follow TRL's PPO (v0.11-v0.x) and LlamaFactory, except that the score is placed on the last
*real* response token (TRL places it one position later when there is room).
"""

from __future__ import annotations

from typing import Literal

import torch


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of `values` where `mask` is 1. values, mask: same shape; `dim` None sums everything."""
    masked = values * mask
    return masked.sum() if dim is None else masked.sum(dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` over positions where `mask` is 1 (0 where the mask is empty)."""
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(values, mask, dim) / count.clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of `values` over the masked positions (Bessel-corrected unless `unbiased=False`)."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        count = mask.sum()
        var = var * count / (count - 1).clamp(min=1)
    return var


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """`(values - mean) / sqrt(var + 1e-8)` with mean and (unbiased) variance over the masked positions.

    With `shift_mean=False` the mean is added back (TRL's reward whitening only rescales). Masked positions
    are set to 0 in the output.

    Args:
        values: (B, L) float.
        mask: (B, L) 0/1.
    Returns:
        (B, L) float.
    """
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def kl_per_token(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, estimator: Literal["k1", "k3"] = "k1"
) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi, 0 on masked positions.

    k1: `log pi - log pi_ref` (unbiased, can be negative); k3: `(r - 1) - log r` with `r = pi_ref / pi`
    (unbiased and always >= 0, Schulman's estimator).

    Args:
        logprobs, ref_logprobs: (B, L) fp32 log-probs of the sampled tokens.
        mask: (B, L) 0/1.
    Returns:
        (B, L) fp32.
    """
    log_ratio = ref_logprobs - logprobs
    if estimator == "k1":
        kl = -log_ratio
    elif estimator == "k3":
        kl = torch.expm1(log_ratio) - log_ratio
    else:
        raise ValueError(f"unknown KL estimator {estimator!r}; expected 'k1' or 'k3'")
    return kl * mask


def last_token_positions(mask: torch.Tensor) -> torch.Tensor:
    """mask: (B, L) 0/1 with each row's ones first -> (B,) long, the index of each row's last 1 (-1 if none)."""
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, torch.full_like(positions, -1)).max(dim=-1).values


def token_rewards(
    scores: torch.Tensor, kl: torch.Tensor, kl_coef: torch.Tensor | float, mask: torch.Tensor
) -> torch.Tensor:
    """Per-token rewards of RLHF: `-kl_coef(x) * kl_t` on every response token, plus the score on the last one.

    Args:
        scores: (B,) the sequence-level reward of each response.
        kl: (B, L) per-token KL estimate (0 on padding).
        kl_coef: a float, or (B,) one coefficient per prompt (contextual KL control).
        mask: (B, L) 0/1 response mask; each row needs at least one token.
    Returns:
        (B, L) fp32, 0 on padding.
    """
    coef = kl_coef.unsqueeze(-1) if isinstance(kl_coef, torch.Tensor) else kl_coef
    rewards = -coef * kl * mask
    rows = torch.arange(mask.shape[0], device=mask.device)
    last = last_token_positions(mask)
    if (last < 0).any():
        raise ValueError("every response needs at least one token (a row of the mask is all zeros)")
    return rewards.index_put((rows, last), scores.to(rewards.dtype), accumulate=True)


def gae_advantages(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the response tokens.

    `delta_t = r_t + gamma * V_{t+1} - V_t`, `A_t = delta_t + gamma * lam * A_{t+1}`, with `V` and `A` taken as
    0 after the last response token (the episode ends there); returns `R_t = A_t + V_t`.

    Args:
        rewards: (B, L) per-token rewards.
        values: (B, L) critic values V(x, y_<t).
        mask: (B, L) 0/1; each row's ones come first.
        gamma: discount; lam: GAE lambda.
    Returns:
        advantages (B, L) and returns (B, L), both 0 on padding.
    """
    rewards, values = rewards * mask, values * mask
    length = rewards.shape[1]
    advantage = torch.zeros_like(rewards[:, 0])
    reversed_advantages = []
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else torch.zeros_like(values[:, t])
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * advantage
        reversed_advantages.append(advantage)
    advantages = torch.stack(reversed_advantages[::-1], dim=1) * mask
    return advantages, (advantages + values) * mask


def clipped_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate objective, as a loss.

    `ratio = exp(logprobs - old_logprobs)`;
    `loss = masked_mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)))`.

    Args:
        logprobs: (B, L) log-probs under the policy being trained (with gradient).
        old_logprobs: (B, L) log-probs of the same tokens at rollout time.
        advantages: (B, L).
        mask: (B, L) 0/1.
        cliprange: eps.
    Returns:
        loss (scalar), clipfrac (scalar, the fraction of tokens where the clipped term is the larger, i.e. active),
        approxkl (scalar, `0.5 * masked_mean((logprobs - old_logprobs)^2)`, detached).
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).float(), mask)
        approxkl = 0.5 * masked_mean(log_ratio**2, mask)
    return loss, clipfrac, approxkl


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped value loss.

    `v_clip = clip(values, old_values - c, old_values + c)`;
    `loss = 0.5 * masked_mean(max((values - R)^2, (v_clip - R)^2))`.

    Args:
        values: (B, L) the critic's values now (with gradient).
        old_values: (B, L) its values at rollout time.
        returns: (B, L) GAE returns.
        mask: (B, L) 0/1.
        cliprange_value: c.
    Returns:
        loss (scalar) and clipfrac (scalar, the fraction of tokens where the clipped term is the larger).
    """
    clipped_values = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    unclipped_loss = (values - returns) ** 2
    clipped_loss = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_loss, clipped_loss), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped_loss > unclipped_loss).float(), mask)
    return loss, clipfrac


def disco_risk_adjusted_reward(mean: torch.Tensor, variance: torch.Tensor | None, risk_coef: float) -> torch.Tensor:
    """`mean - risk_coef * sqrt(variance)`: a Disco reward model's score, made careful where it is unsure.

    Args:
        mean: (B,) reward means.
        variance: (B,) reward variances, or None for a scalar reward model (then `risk_coef` must be 0).
        risk_coef: >= 0; 0 returns `mean` itself.
    Returns:
        (B,) fp32.
    """
    if risk_coef == 0:
        return mean
    if variance is None:
        raise ValueError("a risk coefficient needs the reward model's variance")
    return mean - risk_coef * torch.sqrt(variance)


def beta_controller_loss(scale: torch.Tensor, sequence_kl: torch.Tensor, target_kl: float) -> torch.Tensor:
    """The beta head's loss in PPO: a per-prompt proportional KL controller made differentiable.

    `loss = mean_x( -s(x) * stopgrad(KL(x) - target_kl) )`. Its gradient with respect to s(x) is
    `-(KL(x) - target_kl)`: a descent step raises s(x), and so the KL coefficient `pref_beta * s(x)`, for a
    prompt whose observed KL exceeds the target, and lowers it for a prompt below the target, in proportion to
    the error.

    Args:
        scale: (B,) s(x) from the beta head (with gradient).
        sequence_kl: (B,) the observed KL of each prompt's response (summed over its tokens).
        target_kl: the per-response KL the controller aims at.
    Returns:
        scalar loss.
    """
    error = (sequence_kl - target_kl).detach()
    return -(scale * error).mean()
