"""The two numerical pieces every Disco (probit) loss shares: `log Phi` in float64, and the variance-scale prior.

Why float64: `torch.special.log_ndtr` is finite for any z, but in fp32 its *gradient* goes wrong below z ~ -300
(at z = -1000 it is -955.6 instead of -1000). The arguments are (B,)-sized, so float64 costs nothing.

Why a prior: in `z = diff / sqrt(var_a + var_b)` the variances are an inverse temperature. Shrinking all of them
sharpens every prediction, so as training pairs get separated the likelihood alone drives every variance to the
floor (measured: sigma^2 from 1 to 0.011 in ~1000 steps with d fixed), where one wrong pair costs ~1e4. A
Normal(0, 1/lambda) prior on each log-variance anchors the scale at any batch size, even one pair per device
(a per-batch normaliser would cancel the variance entirely there). Its pull `lambda * log sigma^2` grows without
bound while the likelihood's pull on a correctly ordered pair, `(z phi(z) / Phi(z)) / 2 * var_a / (var_a + var_b)`,
is at most ~0.15 and vanishes as z grows; so a variance can never fall below `exp(-0.15 / lambda)`, while
disagreeing pairs (z < 0, pull ~ z^2 / 2) still raise it. Derivation: docs/disco_variance.md.
"""

from __future__ import annotations

import torch


def probit_log_likelihood(z: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """`(1 - ls) log Phi(z) + ls log Phi(-z)` computed in float64, returned as fp32.

    Args:
        z: (B,) probit arguments, any float dtype (upcast to float64 *before* any arithmetic by the caller when
            z itself is large; see `probit_z`).
        label_smoothing: ls in [0, 0.5).
    Returns:
        (B,) fp32 log-likelihoods (<= 0).
    """
    z = z.double()
    out = (1.0 - label_smoothing) * torch.special.log_ndtr(z)
    if label_smoothing:
        out = out + label_smoothing * torch.special.log_ndtr(-z)
    return out.float()


def probit_z(diff: torch.Tensor, var_a: torch.Tensor, var_b: torch.Tensor) -> torch.Tensor:
    """`z = diff / sqrt(var_a + var_b)` in float64. All (B,); returns (B,) float64."""
    return diff.double() / torch.sqrt(var_a.double() + var_b.double())


def log_variance_prior(variance: torch.Tensor, strength: float) -> torch.Tensor:
    """Negative log-density (up to a constant) of a Normal(0, 1/strength) prior on `log variance`.

    `strength / 2 * (log sigma^2)^2` per response: 0 at sigma^2 = 1 (the head's initial value), so the scale of
    the variance is anchored there while each response's variance can still move to fit its label noise.

    Args:
        variance: (...,) variances (> 0).
        strength: lambda >= 0; 0 gives zeros.
    Returns:
        (...,) fp32 penalties.
    """
    return 0.5 * strength * torch.log(variance.float()) ** 2
