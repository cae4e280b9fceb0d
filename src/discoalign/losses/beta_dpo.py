"""beta-DPO (Wu et al. 2024, https://arxiv.org/abs/2407.08639): one beta per batch, from the implicit margins.

The baseline that dynamic beta is compared against. Per step, with the implicit margin
`d_i = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))` (detached) and running statistics
`M0`, `sd` of d (exponential moving averages, momentum 0.9, updated with the batch before use):

* beta-guided filtering: keep `ceil((1 - rho) B)` pairs drawn without replacement with probability proportional
  to `exp(-(d_i - M0)^2 / (2 sd^2))`, i.e. drop the pairs whose margin is an outlier (likely mislabelled, or
  already learned);
* batch beta: `beta = pref_beta * (1 + alpha * (mean_kept(d) - M0))`, floored at 1e-3 as in the paper's code;
  used detached in the ordinary sigmoid loss, averaged over the kept pairs.

This follows the authors' reference code (their `trainers.py`): the same statistics, filter and beta rule.
Pure functions; the trainer holds the running statistics.
"""

from __future__ import annotations

import math

import torch

BETA_DPO_MOMENTUM = 0.9
BETA_DPO_MIN_BETA = 1e-3  # the reference code's floor: the rule can go negative for a batch far below M0


def update_margin_statistics(
    margins: torch.Tensor, mean: torch.Tensor | None, std: torch.Tensor | None, momentum: float = BETA_DPO_MOMENTUM
) -> tuple[torch.Tensor, torch.Tensor]:
    """EMA of the batch mean and standard deviation of the margins.

    Args:
        margins: (B,) implicit margins d (detached).
        mean, std: 0-dim running statistics, or None before the first batch (then the batch's own are used).
        momentum: weight of the old value.
    Returns:
        (mean, std), 0-dim fp32 tensors.
    """
    d = margins.detach().float()
    batch_mean = d.mean()
    batch_std = d.std(unbiased=False) if d.numel() > 1 else torch.zeros((), device=d.device)
    if mean is None or std is None:
        return batch_mean, batch_std
    return momentum * mean + (1 - momentum) * batch_mean, momentum * std + (1 - momentum) * batch_std


def beta_dpo_batch(
    margins: torch.Tensor,
    running_mean: torch.Tensor,
    running_std: torch.Tensor,
    pref_beta: float,
    alpha: float,
    filter_fraction: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's beta and the mask of kept pairs.

    Args:
        margins: (B,) implicit margins d (detached).
        running_mean, running_std: 0-dim running statistics of d (after this batch's update).
        pref_beta: base beta.
        alpha: sensitivity of beta to the batch's mean margin.
        filter_fraction: rho in [0, 1), the fraction of pairs dropped; at least one pair is kept.
        generator: RNG for the draw (default: torch's global one, seeded by the run).
    Returns:
        beta: 0-dim fp32 tensor (no gradient); keep: (B,) bool.
    """
    d = margins.detach().float()
    n = d.numel()
    keep_n = max(1, math.ceil((1.0 - filter_fraction) * n))
    if keep_n >= n:
        keep = torch.ones(n, dtype=torch.bool, device=d.device)
    else:
        std = running_std.clamp_min(1e-6)
        weights = torch.exp(-0.5 * ((d - running_mean) / std) ** 2)
        if not torch.isfinite(weights).all() or weights.sum() <= 0:
            weights = torch.ones_like(d)
        weights = weights + 1e-12  # multinomial needs enough positive weights for keep_n draws
        index = torch.multinomial(weights, keep_n, replacement=False, generator=generator)
        keep = torch.zeros(n, dtype=torch.bool, device=d.device)
        keep[index] = True
    beta = pref_beta * (1.0 + alpha * (d[keep].mean() - running_mean))
    return beta.clamp_min(BETA_DPO_MIN_BETA), keep
