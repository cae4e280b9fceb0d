"""The forward-corrected preference likelihood with a per-context label-flip rate e(x) (docs/noisy_labels.md).

If the label of a pair is flipped with probability e(x), the probability of the observed label is

    P(y_w > y_l | x) = (1 - e) sigmoid(z) + e sigmoid(-z),     z = beta d (DPO) or mu_w - mu_l - m (reward model)

and the loss is `-log P`, computed as `-logaddexp(log(1 - e) + logsigmoid(z), log e + logsigmoid(-z))` in fp32
(exact for very negative z; `e = 0` gives `-logsigmoid(z)`, DPO / Bradley–Terry, exactly). The two parameter sets
train on two terms (the "Identification" section of the docs):

* the policy (reward model) on `-log P(z, stop_grad(e))`;
* the head on `-log P(gamma * stop_grad(z) / r, e)` plus the Beta prior on `2 e`, with `gamma` the head's calibration
  scale and `r` the running root-mean-square of the detached margins (`MarginScale`): e(x) is the lapse rate of a
  logistic curve fitted to the standardised margins, not a free temperature.

Pure functions over tensors; every per-pair tensor (B,).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def forward_corrected_nll(z: torch.Tensor, e: torch.Tensor | float) -> torch.Tensor:
    """`-log((1 - e) sigmoid(z) + e sigmoid(-z))`, (B,) fp32; e in [0, 1/2), 0 allowed (then `-logsigmoid(z)`)."""
    z = z.float()
    e = torch.as_tensor(e, dtype=torch.float32, device=z.device).expand_as(z)
    positive = e > 0
    log_e = torch.where(positive, torch.log(torch.where(positive, e, torch.ones_like(e))), -torch.inf)
    return -torch.logaddexp(torch.log1p(-e) + F.logsigmoid(z), log_e + F.logsigmoid(-z))


def flip_prior(e: torch.Tensor, mean: float, strength: float) -> torch.Tensor:
    """The Beta prior on `q = 2 e` with mode `2 * mean`, per pair: `strength * KL(Bern(2 mean) || Bern(2 e))` (0 at the
    mode). (B,) fp32; 0 when `strength` is 0."""
    if not strength:
        return torch.zeros_like(e, dtype=torch.float32)
    q, q0 = 2.0 * e.float(), torch.tensor(2.0 * mean, dtype=torch.float32, device=e.device)
    kl = torch.xlogy(q0, q0) - torch.xlogy(q0, q) + torch.xlogy(1 - q0, 1 - q0) - torch.xlogy(1 - q0, 1 - q)
    return strength * kl


class MarginScale:
    """Running root-mean-square `r` of the detached margins z over training batches (an exponential average with
    rate `RATE`, bias-corrected), so the head's term reads `z / r` whatever scale the policy's margins have reached:
    its slope `gamma` then only learns the shape of the agreement curve. 1 before the first training batch."""

    RATE = 0.02

    def __init__(self) -> None:
        self.mean_square, self.weight = 0.0, 0.0

    def __call__(self, z: torch.Tensor, training: bool) -> float:
        if training:
            value = float(z.detach().float().pow(2).mean())
            self.mean_square = (1 - self.RATE) * self.mean_square + self.RATE * value
            self.weight = (1 - self.RATE) * self.weight + self.RATE
        if self.weight == 0 or self.mean_square <= 0:
            return 1.0
        return math.sqrt(self.mean_square / self.weight)


def flip_corrected_losses(
    z: torch.Tensor, e: torch.Tensor, scale: torch.Tensor | float = 1.0, prior_mean: float = 0.0, prior_strength=0.0
) -> torch.Tensor:
    """Per-pair loss of the module docstring. Its value is the forward-corrected `-log P(z, e)`; its gradient is the
    policy's term's (in z, e fixed) plus the head's term's (in e and `scale`, z detached), prior included. `scale`
    already holds gamma / r.

    Args:
        z: (B,) logits with gradient (beta d, or the reward margin).
        e: (B,) flip rates in [0, 1/2) with gradient (the head's output).
        scale: the head's calibration slope over the margins' scale, gamma / r (a (B,) tensor or a float).
    """
    policy = forward_corrected_nll(z, e.detach())
    head = forward_corrected_nll(scale * z.detach().float(), e) + flip_prior(e, prior_mean, prior_strength)
    return policy + (head - head.detach())
