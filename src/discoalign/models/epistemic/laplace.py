"""`epistemic: laplace`: a last-layer Laplace posterior over the value head, read on pair differences.

The reward is `r(y) = w . e(y) + b`, e = the pooled last hidden state. The preference likelihood sees only
differences, `P(y_w > y_l) = link(w . D)`, D = e(y_w) - e(y_l). With a prior w ~ N(0, I / lambda) and the trained
head as the mode, the Laplace (generalised Gauss-Newton) posterior is

    Sigma = (lambda I + sum_i c_i D_i D_i^T)^-1,    c_i = p_i (1 - p_i)            (BT, logistic link)
                                                    c_i = phi(z_i)^2 / (s_i^2 Phi(z_i) Phi(-z_i))   (Disco, probit)

with p_i the fitted pair probability: sigmoid(mu_w - mu_l) for BT; Phi(z_i), z_i = (mu_w - mu_l) / s_i,
s_i^2 = var_w + var_l for Disco (the probability Disco's loss fits; c_i is its Fisher information about w . D).
A response's epistemic variance is the posterior variance of its reward *relative to the training mean*,

    u(y)^2 = (e_y - e_bar)^T Sigma (e_y - e_bar),   e_bar = mean feature of the training responses,

because a pair likelihood is blind to adding one constant to every reward: along a feature direction shared by all
responses the posterior stays the prior, and `e_y^T Sigma e_y` would charge every response that same unresolvable
(and ranking-irrelevant) variance. Centring removes it exactly: shifting every feature by a constant vector leaves D,
Sigma and e_y - e_bar, hence u, unchanged. lambda maximises the Laplace evidence (MacKay 1992; Immer et al. 2021)
over a log grid, the mode fixed at the trained head w*:

    log Z(lambda) = -lambda/2 |w*|^2 + d/2 log lambda - 1/2 sum_j log(lambda + h_j) + const,  h_j = eig(H).

Cost: one forward pass over the training pairs, H in N d^2, one eigendecomposition and one Cholesky (d^3); memory
d^2 x 8 bytes for Sigma. docs/reward_overoptimization.md has the derivation and measurements.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ...errors import CheckpointError
from .base import EPISTEMIC_WEIGHTS_NAME, EpistemicInputs, FitData

# The evidence grid: lambda = 10^k for k in [LOG10_MIN, LOG10_MAX], step LOG10_STEP.
LOG10_MIN, LOG10_MAX, LOG10_STEP = -6.0, 6.0, 0.05
LINKS = ("logistic", "probit")


def fisher_weights(margin: torch.Tensor, variance: torch.Tensor | None = None) -> torch.Tensor:
    """(N,) fitted mean differences mu_w - mu_l (and, for Disco, var_w + var_l) -> (N,) fp64 curvature c_i of the
    pair log-likelihood in w . D: p (1 - p) for the logistic link, the probit's Fisher weight when `variance` is
    given."""
    d = margin.double()
    if variance is None:
        p = torch.sigmoid(d)
        return p * (1 - p)
    s2 = variance.double().clamp_min(1e-12)
    z = d / s2.sqrt()
    log_phi = -0.5 * z * z - 0.5 * math.log(2 * math.pi)
    log_w = 2 * log_phi - torch.special.log_ndtr(z) - torch.special.log_ndtr(-z) - s2.log()
    return log_w.exp()


def curvature(differences: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(N, d) pair differences D and (N,) weights c -> (d, d) fp64 H = sum_i c_i D_i D_i^T."""
    D = differences.double()
    return D.T @ (D * weights.double()[:, None])


def log_evidence(eigenvalues: torch.Tensor, head_sq_norm: float, prior_precision: torch.Tensor) -> torch.Tensor:
    """Laplace log evidence (up to a constant) at each prior precision, from the eigenvalues of H and |w*|^2."""
    lam = prior_precision.double()[:, None]
    h = eigenvalues.double().clamp_min(0.0)[None, :]
    d = eigenvalues.numel()
    return -0.5 * lam[:, 0] * head_sq_norm + 0.5 * d * lam[:, 0].log() - 0.5 * torch.log(lam + h).sum(1)


def evidence_precision(H: torch.Tensor, head: torch.Tensor) -> tuple[float, float]:
    """The grid lambda of largest Laplace evidence, and that log evidence."""
    grid = 10.0 ** torch.arange(LOG10_MIN, LOG10_MAX + LOG10_STEP / 2, LOG10_STEP, dtype=torch.float64)
    values = log_evidence(torch.linalg.eigvalsh(H), float(head.double().pow(2).sum()), grid)
    best = int(values.argmax())
    return float(grid[best]), float(values[best])


def posterior_covariance(H: torch.Tensor, prior_precision: float) -> torch.Tensor:
    """(lambda I + H)^-1 in fp64 through its Cholesky factor."""
    A = H.double() + prior_precision * torch.eye(H.shape[0], dtype=torch.float64)
    return torch.cholesky_inverse(torch.linalg.cholesky(A))


class LaplacePosterior:
    """Posterior covariance of the value head and the training feature mean; epistemic variance of new responses.

    Args:
        covariance: (d, d) Sigma, fp64.
        feature_mean: (d,) e_bar, fp64.
        prior_precision: the lambda Sigma was formed with.
        link: `logistic` (BT) or `probit` (Disco): how the fitted pair probabilities were formed.
        num_pairs: training pairs the posterior saw; log_evidence: at lambda (for the record).
    """

    kind = "laplace"
    needs_features = True

    def __init__(self, covariance: torch.Tensor, feature_mean: torch.Tensor, prior_precision: float,
                 link: str = "logistic", num_pairs: int = 0, log_evidence: float = 0.0) -> None:  # fmt: skip
        self.covariance = covariance.double()
        self.feature_mean = feature_mean.double()
        self.prior_precision = float(prior_precision)
        self.link = link
        self.num_pairs = int(num_pairs)
        self.log_evidence = float(log_evidence)

    @classmethod
    def from_pairs(cls, features: torch.Tensor, weights: torch.Tensor, head: torch.Tensor,
                   prior_precision: float | None = None, link: str = "logistic") -> LaplacePosterior:  # fmt: skip
        """features: (N, 2, d) chosen / rejected; weights: (N,) curvature c_i; head: (d,) the trained w*.
        `prior_precision` None: chosen by the evidence."""
        features = features.double()
        H = curvature(features[:, 0] - features[:, 1], weights)
        evidence = float("nan")
        if prior_precision is None:
            prior_precision, evidence = evidence_precision(H, head)
        mean = features.reshape(-1, features.shape[-1]).mean(0)
        return cls(posterior_covariance(H, prior_precision), mean, prior_precision, link, features.shape[0], evidence)

    @classmethod
    def fitted(cls, data: FitData) -> LaplacePosterior:
        """One pass of the trained reward model over every training pair (means, features, and Disco's variances)."""
        if data.value_head is None:
            raise ValueError("epistemic: laplace needs the trained value head's weight (FitData.value_head)")
        run = data.pairs(None, True)
        margin = run.means[:, 0] - run.means[:, 1]
        probit = data.link == "probit" and run.variances is not None
        variance = run.variances.sum(1) if probit else None
        link = "probit" if probit else "logistic"
        return cls.from_pairs(run.features, fisher_weights(margin, variance), data.value_head.flatten(), None, link)

    def variance(self, inputs: EpistemicInputs) -> torch.Tensor:
        """(B,) fp32 u^2 = (e - e_bar)^T Sigma (e - e_bar) of the pooled features in `inputs`."""
        if inputs.features is None:
            raise ValueError("epistemic: laplace reads the reward model's pooled features; none were given")
        z = inputs.features.detach().to("cpu", torch.float64) - self.feature_mean
        u2 = ((z @ self.covariance) * z).sum(-1).clamp_min(0.0)
        return u2.float().to(inputs.features.device)

    # ---- persistence ------------------------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        """What `heads_config.json` records under `epistemic`."""
        return {"kind": self.kind, "hidden_size": int(self.feature_mean.numel()), "link": self.link,
                "prior_precision": self.prior_precision, "num_pairs": self.num_pairs,
                "log_evidence": self.log_evidence}  # fmt: skip

    def save(self, output_dir: str) -> None:
        save_file({"covariance": self.covariance.contiguous(), "feature_mean": self.feature_mean.contiguous()},
                  os.path.join(output_dir, EPISTEMIC_WEIGHTS_NAME), metadata={"format": "pt"})  # fmt: skip

    @classmethod
    def load(cls, path: str, config: dict[str, Any]) -> LaplacePosterior:
        """Read `epistemic.safetensors` at `path` with the settings `config` (from heads_config.json)."""
        try:
            tensors = load_file(path)
            d = int(config["hidden_size"])
            settings = (float(config["prior_precision"]), str(config.get("link", "logistic")),
                        int(config.get("num_pairs", 0)), float(config.get("log_evidence", 0.0)))  # fmt: skip
        except (OSError, KeyError, ValueError, TypeError, RuntimeError) as e:
            raise CheckpointError(f"Cannot read the epistemic term {path!r}: {' '.join(str(e).split())}") from None
        expected = {"covariance": (d, d), "feature_mean": (d,)}
        for name, shape in expected.items():
            value = tensors.get(name)
            if value is None or tuple(value.shape) != shape:
                raise CheckpointError(
                    f"{path!r}: `{name}` is missing or has the wrong shape (expected {shape}); the file does not "
                    "match heads_config.json's `epistemic` settings."
                )
        return cls(tensors["covariance"], tensors["feature_mean"], *settings)
