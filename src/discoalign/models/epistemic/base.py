"""The protocol of an epistemic estimator, and what it is given to fit and to score.

Disco's variance head learns *aleatoric* uncertainty (label noise per context). An epistemic estimator adds the
uncertainty of the reward model itself about responses unlike its training data. It is a property of the reward model
(`epistemic: <kind>` at `stage: rm`): fitted once after training (`fit`), saved beside the heads
(`epistemic.safetensors`, settings under `epistemic` in `heads_config.json`), read back by every loader of reward
models, and applied by `score`, `bon`, `serve` and PPO. It never changes the mean; total variance = aleatoric (Disco
head, or 0) + epistemic.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch

EPISTEMIC_WEIGHTS_NAME = "epistemic.safetensors"


@dataclass
class EpistemicInputs:
    """What an estimator may read of the responses it scores.

    response_ids, response_mask: (B, L) the response tokens (prompt excluded) and their 0/1 mask.
    features: (B, H) fp32, the reward model's pooled last hidden state of prompt + response (what the value head
        reads), when the estimator `needs_features`; else None.
    """

    response_ids: torch.Tensor
    response_mask: torch.Tensor
    features: torch.Tensor | None = None


@dataclass
class PairPass:
    """The trained reward model over training pairs (chosen first): means (N, 2) fp64, and, when asked for, the pooled
    features (N, 2, H) fp32 of chosen and rejected; variances (N, 2) fp64 of a model with a variance head, else None."""

    means: torch.Tensor
    features: torch.Tensor | None = None
    variances: torch.Tensor | None = None


@dataclass
class FitData:
    """What the end of reward-model training offers an estimator to fit on.

    vocab_size, hidden_size: of the reward model.
    responses: a fresh iterable of every training response's token ids.
    pairs: `pairs(max_pairs, with_features)` runs the trained reward model over (up to `max_pairs`, None: all)
        training pairs.
    value_head: (H,) the trained value head's weight w (mean = w . features + b), when the trainer has one.
    link: how the training loss forms pair probabilities: `logistic` (BT) or `probit` (Disco).
    """

    vocab_size: int
    hidden_size: int
    responses: Callable[[], Iterable[list[int]]]
    pairs: Callable[[int | None, bool], PairPass]
    value_head: torch.Tensor | None = None
    link: str = "logistic"


class EpistemicEstimator(Protocol):
    """kind: the `epistemic:` config value. needs_features: `variance` reads `EpistemicInputs.features`."""

    kind: ClassVar[str]
    needs_features: ClassVar[bool]

    @classmethod
    def fitted(cls, data: FitData) -> EpistemicEstimator:
        """A new estimator fitted on the reward model's training data."""
        ...

    def variance(self, inputs: EpistemicInputs) -> torch.Tensor:
        """(B,) fp32 epistemic variance of each response, in reward units squared."""
        ...

    def config(self) -> dict[str, Any]:
        """The JSON-able settings `heads_config.json` records under `epistemic` (with `kind`)."""
        ...

    def save(self, output_dir: str) -> None:
        """Write `epistemic.safetensors` into `output_dir`."""
        ...

    @classmethod
    def load(cls, path: str, config: dict[str, Any]) -> EpistemicEstimator:
        """Read `epistemic.safetensors` at `path` with the settings `config`; CheckpointError when they disagree."""
        ...
