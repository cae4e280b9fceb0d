"""The heads of docs/design.md §2 (value, variance, beta) and `HEAD_MODULES`, the model side of the head registry.

All heads compute in fp32 whatever the backbone's dtype. The variance and beta heads are created
without touching the global RNG (their init is a constant), so that adding a head that the algorithm
does not use leaves every random draw of the run, and therefore every number, unchanged.

Adding a head (docs/extending.md): its spec and keys in `config/heads.py`, its class and builder here, and its term
in an objective of `losses/`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..config.plan import HeadPlan

# softplus(log(e - 1)) == 1: every variance is 1 at step 0.
VARIANCE_BIAS_INIT = math.log(math.e - 1.0)
VARIANCE_FLOOR = 1e-6
# Per-pair step of the beta head's offset (see BetaHead): a time constant of ~500 pairs whatever the batch size.
OFFSET_RATE = 2e-3


def _constant_linear(hidden_size: int, weight: float, bias: float) -> nn.Linear:
    """An fp32 `nn.Linear(hidden_size, 1)` with constant init, created without consuming RNG."""
    layer = nn.Linear(hidden_size, 1, device="meta", dtype=torch.float32)
    layer.to_empty(device="cpu")
    with torch.no_grad():
        layer.weight.fill_(weight)
        layer.bias.fill_(bias)
    return layer


class ValueHead(nn.Module):
    """Mean reward `mu = w . dropout(h) + b`.

    Args:
        hidden_size: width of the backbone's last hidden state.
        dropout: dropout probability on `h` (0 disables it).
        init_std: None keeps PyTorch's default `nn.Linear` init; a float draws `w ~ N(0, init_std)`, `b = 0`.
    """

    def __init__(self, hidden_size: int, dropout: float = 0.0, init_std: float | None = None) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.summary = nn.Linear(hidden_size, 1, dtype=torch.float32)
        if init_std is not None:
            nn.init.normal_(self.summary.weight, mean=0.0, std=init_std)
            nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: (..., H) any float dtype -> mean (...,) fp32."""
        return self.summary(self.dropout(hidden.float())).squeeze(-1)


class VarianceHead(nn.Module):
    """Reward variance `sigma^2 = softplus(w . dropout(h) + b) + 1e-6`, initialised to sigma^2 = 1 everywhere."""

    def __init__(self, hidden_size: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.summary = _constant_linear(hidden_size, 0.0, VARIANCE_BIAS_INIT)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: (..., H) -> variance (...,) fp32, > 0."""
        raw = self.summary(self.dropout(hidden.float())).squeeze(-1)
        return F.softplus(raw) + VARIANCE_FLOOR


class FeatureCentring:
    """Running centring statistics of a prompt-reading head: `feature_mean` (H,) and `feature_count` () buffers (the
    subclass registers them), a cumulative mean of every feature seen in training, or the exact data mean."""

    feature_mean: torch.Tensor
    feature_count: torch.Tensor
    track_statistics: bool

    def register_centring(self, hidden_size: int) -> None:
        self.register_buffer("feature_mean", torch.zeros(hidden_size, dtype=torch.float32))
        self.register_buffer("feature_count", torch.zeros((), dtype=torch.float32))
        # False once `set_statistics` gave the exact data mean: nothing is left to estimate.
        self.track_statistics = True

    @torch.no_grad()
    def update_statistics(self, features: torch.Tensor) -> None:
        """Fold (B, H) features into the cumulative mean `feature_mean` (count in `feature_count`).

        Under data parallelism the sums are all-reduced first, so every rank folds in the global batch and the
        statistics equal a single process's with the same global batch.
        """
        features = features.detach().float().reshape(-1, self.feature_mean.shape[0])
        sums = _global_sum(torch.cat([features.sum(0), features.new_tensor([features.shape[0]])]))
        n = sums[-1]
        if n.item() == 0:
            return
        self.feature_count.add_(n)
        self.feature_mean.add_((sums[:-1] - n * self.feature_mean) / self.feature_count)

    @torch.no_grad()
    def set_statistics(self, mean: torch.Tensor, count: int) -> None:
        """Set the centring mean exactly (e.g. over the whole training set, when the reference is precomputed).

        Training then leaves it as it is (no running update).
        """
        self.feature_mean.copy_(mean.detach().float().to(self.feature_mean.device))
        self.feature_count.fill_(float(count))
        self.track_statistics = False


class BetaHead(FeatureCentring, nn.Module):
    """Beta scale `s(x) = 1 + eps * tanh(u(x))`, zero-initialised so s(x) = 1 at step 0.

    `h_ref` is the *reference* model's prompt feature (last prompt token, or the mean over the prompt's tokens),
    computed without gradient; only this head's parameters learn, through the preference loss. s(x) lies in
    (1 - eps, 1 + eps).

    Centred (the DPO default, docs/dynamic_beta.md): `u = w . (h_ref - m)` with no bias, where `m` is the mean of
    every feature the head has seen in training (a cumulative mean, exact after one epoch; set from the whole
    data set when the reference is precomputed). Over the data `u` then has mean 0 whatever `w` is, so the head
    can only *redistribute* `pref_beta` across contexts: the global-scale direction, along which the
    preference likelihood alone would push beta to `1 + eps` everywhere, gets no gradient. `m` and the count
    behind it are buffers, saved with the head.

    Uncentred (`centered=False`, the PPO KL controller): `u = w . h_ref + b`; there a target KL fixes the
    overall level, so the bias is identifiable and needed.
    """

    # Entries a checkpoint may lack: heads saved before the head was centred have a bias and no centring statistics;
    # a centred head has no bias. A missing one keeps its fresh value (bias 0, no statistics yet).
    OPTIONAL_STATE_KEYS = ("summary.bias", "feature_mean", "feature_count", "logit_offset")

    def __init__(self, hidden_size: int, epsilon: float, centered: bool = True, kind: str = "tanh") -> None:
        # epsilon in (0, 1) is checked where heads are planned (`config.plan.HeadPlan`, `config.heads`)
        super().__init__()
        self.epsilon = epsilon
        self.centered = centered
        self.kind = kind  # `exp`: s = exp(u), E[log s] = E[u] = 0 by the centring alone (docs/dynamic_beta.md §6)
        if centered:
            layer = nn.Linear(hidden_size, 1, bias=False, device="meta", dtype=torch.float32)
            layer.to_empty(device="cpu")
            with torch.no_grad():
                layer.weight.zero_()
            self.summary = layer
        else:
            self.summary = _constant_linear(hidden_size, 0.0, 0.0)
        # Centring statistics (unused when uncentred, but always present so checkpoints have one layout).
        self.register_centring(hidden_size)
        # The offset c in tanh(u - c) that keeps the data mean of tanh, hence of s(x), at 0 (respectively 1):
        # centring makes E[u] = 0, but tanh is not linear, and a head that saturates on a frequent context would
        # move the mean of s. c is not learned from the loss (that would be the bias again); it follows the
        # root of E[tanh(u - c)] = 0 by stochastic approximation (docs/dynamic_beta.md).
        self.register_buffer("logit_offset", torch.zeros((), dtype=torch.float32))

    def logit(self, ref_hidden: torch.Tensor) -> torch.Tensor:
        """ref_hidden: (B, H) -> u(x) - c: (B,) fp32, centred on the feature mean and offset when `centered`.

        In training mode a centred head first folds the features into `feature_mean`, then, after computing
        the logits, moves `logit_offset` (used from the next batch on) towards the root of E[tanh(u - c)] = 0.
        """
        h = ref_hidden.float()
        if not self.centered:
            return self.summary(h).squeeze(-1)
        if self.training and self.track_statistics:
            self.update_statistics(h)
        logit = self.summary(h - self.feature_mean).squeeze(-1) - self.logit_offset
        if self.training and self.kind == "tanh":
            with torch.no_grad():
                self.logit_offset.add_(OFFSET_RATE * _global_sum(torch.tanh(logit.detach()).sum()))
        return logit

    def forward(self, ref_hidden: torch.Tensor) -> torch.Tensor:
        """ref_hidden: (B, H) -> s(x): (B,) fp32 in (1 - eps, 1 + eps) (`tanh`), or exp(u) > 0 (`exp`). In training
        mode, also updates statistics."""
        if self.kind == "exp":
            return torch.exp(self.logit(ref_hidden))
        return 1.0 + self.epsilon * torch.tanh(self.logit(ref_hidden))


class FlipRateHead(FeatureCentring, nn.Module):
    """Label-flip rate `e(x) = sigmoid(w . (h_ref - m) + b) / 2` in (0, 1/2), and the calibration scale `gamma`.

    Reads the reference's prompt features like the beta head (centred on their running mean `m`, so `b` alone
    sets the data-level rate); fp32; built without drawing random numbers (`w = 0`, `e = flip_prior_mean`
    everywhere at step 0). `gamma = exp(log_scale)` (1 at step 0) is the scale at which the head's own term reads the
    detached policy margin (docs/noisy_labels.md, section "Identification"). The forward returns both, keyed
    `flip_head` and `flip_head/scale`, each (B,).
    """

    centered = True  # the exact data mean is set when the reference is precomputed (`DPOTrainer`)
    MIN_PRIOR = 1e-3  # a prior mode of 0 starts the head at e = 5e-4 (its logit is finite)

    def __init__(self, hidden_size: int, prior_mean: float) -> None:
        super().__init__()
        q = min(max(2.0 * prior_mean, self.MIN_PRIOR), 1.0 - self.MIN_PRIOR)
        self.summary = _constant_linear(hidden_size, 0.0, math.log(q / (1.0 - q)))
        self.log_scale = nn.Parameter(torch.zeros((), dtype=torch.float32))
        self.register_centring(hidden_size)

    def rate(self, ref_hidden: torch.Tensor) -> torch.Tensor:
        """(B, H) -> e(x): (B,) fp32 in (0, 1/2). In training mode, first folds the features into the mean."""
        h = ref_hidden.float()
        if self.training and self.track_statistics:
            self.update_statistics(h)
        return 0.5 * torch.sigmoid(self.summary(h - self.feature_mean).squeeze(-1))

    def forward(self, ref_hidden: torch.Tensor) -> dict[str, torch.Tensor]:
        e = self.rate(ref_hidden)
        return {"flip_head": e, "flip_head/scale": self.log_scale.exp().expand_as(e)}


HEAD_MODULES: dict[str, Callable[[int, HeadPlan], nn.Module]] = {
    "value_head": lambda hidden, plan: ValueHead(hidden, plan.dropout, plan.init_std),
    "variance_head": lambda hidden, plan: VarianceHead(hidden, plan.dropout),
    "beta_head": lambda hidden, plan: BetaHead(
        hidden, plan.beta_epsilon, centered=plan.beta_centered, kind=plan.beta_kind
    ),
    "flip_head": lambda hidden, plan: FlipRateHead(hidden, plan.flip_prior_mean),
}
"""Head name -> its builder `(hidden_size, HeadPlan) -> module`; the names are `config.heads.HEAD_NAMES`."""


def build_heads(hidden_size: int, plan: HeadPlan) -> dict[str, nn.Module]:
    """The heads `plan` names, built in registry order (only the value head draws random numbers)."""
    return {name: HEAD_MODULES[name](hidden_size, plan) for name in plan.names}


def reward_heads(has_variance: bool) -> HeadPlan:
    """A frozen reward model's heads: the value head, and the variance head when its checkpoint has one (built with
    the schema's settings; nothing of them trains)."""
    return HeadPlan.of("value_head", *(("variance_head",) if has_variance else ()))


def _global_sum(value: torch.Tensor) -> torch.Tensor:
    """`value` summed over the ranks of an initialised process group (itself in a single process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value)
    return value


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last non-padding token of each row, from the mask alone.

    Works for left and right padding and when pad == EOS, because it never looks at token ids.

    Args:
        attention_mask: (B, T) of 0/1.
    Returns:
        (B,) long: for row b, the largest t with attention_mask[b, t] == 1.
    """
    mask = attention_mask.to(torch.long)
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, torch.full_like(positions, -1)).max(dim=-1).values


def gather_last_token(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """hidden: (B, T, H), attention_mask: (B, T) -> (B, H), the hidden state at each row's last real token."""
    index = last_token_index(attention_mask)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), index]


def pool_prompt(
    hidden: torch.Tensor, attention_mask: torch.Tensor, prompt_last_index: torch.Tensor, pooling: str
) -> torch.Tensor:
    """(N, T, H) hidden states whose first B rows hold each pair's prompt -> (B, H) fp32 prompt features: the state at
    the last prompt token (`last`) or the mean over the prompt's real tokens (`mean`); see
    `train.dpo.reference.prompt_features`."""
    batch = prompt_last_index.shape[0]
    rows = torch.arange(batch, device=hidden.device)
    if pooling == "last":
        return hidden[rows, prompt_last_index].float()
    positions = torch.arange(hidden.shape[1], device=hidden.device)
    mask = (positions[None, :] <= prompt_last_index[:, None]) & attention_mask[:batch].bool()
    weights = mask.float()
    return (hidden[:batch].float() * weights[..., None]).sum(1) / weights.sum(1, keepdim=True)
