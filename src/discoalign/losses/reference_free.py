"""The reference-free members of the DPO family: SimPO and ORPO (docs/dpo.md "Reference-free losses").

Pure functions over the policy's length-averaged response log-probs `a_w = log pi(y_w) / |y_w|`,
`a_l = log pi(y_l) / |y_l|` (B,). No reference model takes part: its log-probs are 0 where the trainer's `PairBatch`
holds them, so DPO's implicit rewards `beta (log pi - log pi_ref)` become `beta * a`, as TRL and LlamaFactory log them.

* SimPO (Meng et al. 2024, https://arxiv.org/abs/2405.14734):
  `-(1 - ls) log sigmoid(beta (a_w - a_l) - gamma) - ls log sigmoid(-(beta (a_w - a_l) - gamma))`,
  gamma = `simpo_gamma` (TRL's CPO `loss_type="simpo"`; LlamaFactory's `simpo` with ls = 0).
* ORPO (Hong et al. 2024, https://arxiv.org/abs/2403.07691): `-a_w + lambda * (-log sigmoid(log odds))`,
  `log odds = (a_w - a_l) - (log(1 - exp a_w) - log(1 - exp a_l))`, lambda = `pref_beta` (LlamaFactory's
  `odds_ratio_loss`; TRL's `odds_ratio_loss` returns `lambda log sigmoid(log odds)`, the same term with its sign).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dpo import DPO_LOSS_TYPES

REFERENCE_FREE_LOSS_TYPES = ("simpo", "orpo")
# Every `pref_loss` (the config's allowed values).
PREF_LOSS_TYPES = DPO_LOSS_TYPES + REFERENCE_FREE_LOSS_TYPES

_MINUS_LN2 = -0.6931471805599453


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """`log(1 - exp(x))` for x <= 0, without cancellation (the branch at -ln 2 of Maechler 2012, as TRL's)."""
    return torch.where(x < _MINUS_LN2, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def simpo_loss(
    chosen_avg: torch.Tensor, rejected_avg: torch.Tensor, beta: float, gamma: float, label_smoothing: float
) -> torch.Tensor:
    """(B,) fp32 SimPO loss from length-averaged log-probs (module docstring); `gamma` is the target margin."""
    logits = beta * (chosen_avg.float() - rejected_avg.float()) - gamma
    return -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def orpo_log_odds(chosen_avg: torch.Tensor, rejected_avg: torch.Tensor) -> torch.Tensor:
    """(B,) fp32 log odds ratio `log(odds(y_w) / odds(y_l))`, `odds(y) = P(y) / (1 - P(y))`, `P = exp(a)`."""
    chosen, rejected = chosen_avg.float(), rejected_avg.float()
    return (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))


def orpo_loss(
    chosen_avg: torch.Tensor, rejected_avg: torch.Tensor, beta: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(B,) fp32 ORPO loss (module docstring) and its metrics under TRL's names, each 0-dim and detached:
    `nll_loss` (mean of `-a_w`), `log_odds_ratio` (mean of `log sigmoid(log odds)`), `log_odds_chosen` (mean of the
    log odds)."""
    log_odds = orpo_log_odds(chosen_avg, rejected_avg)
    ratio = F.logsigmoid(log_odds)
    nll = -chosen_avg.float()
    metrics = {
        "nll_loss": nll.detach().mean(),
        "log_odds_ratio": ratio.detach().mean(),
        "log_odds_chosen": log_odds.detach().mean(),
    }
    return nll - beta * ratio, metrics
