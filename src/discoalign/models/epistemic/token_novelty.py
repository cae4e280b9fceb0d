"""`epistemic: token_novelty`: how many of a response's tokens and adjacent token pairs training never showed.

`TokenNovelty` counts, once after training, every response token and every pair of adjacent response tokens (hashed
into a fixed table) of the training pairs; a response's epistemic variance is

    var_epi(y) = prior_variance * (#tokens of y never seen in training + #adjacent pairs of y never seen)

the variance a linear reward with one fresh, N(0, prior_variance) weight per unseen feature would have (Bayesian
linear regression with the seen features known exactly). `prior_variance` is the variance of the trained model's
mean reward over training responses, so the term is on the reward's own scale. Unseen tokens catch new subword
pieces; unseen pairs catch new combinations of seen pieces. It is an out-of-distribution signal more than a
calibrated variance (docs/reward_modeling.md "Epistemic uncertainty" says where it fails).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ...errors import CheckpointError
from .base import EPISTEMIC_WEIGHTS_NAME, EpistemicInputs, FitData

# Training pairs whose trained means set `prior_variance` (their variance): enough for a stable estimate.
PRIOR_PAIRS = 512
DEFAULT_BUCKETS = 1 << 18
_HASH_MULT = 1_000_003  # odd, larger than any vocabulary: distinct (a, b) rarely share a bucket


class TokenNovelty:
    """Counts of training response tokens and adjacent token pairs; epistemic variance of new responses.

    Args:
        vocab_size: size of the embedding table (ids >= vocab_size are treated as unseen).
        buckets: size of the hashed pair-count table.
        prior_variance: variance contributed by each unseen token or pair (reward units squared).
    """

    kind = "token_novelty"
    needs_features = False

    def __init__(self, vocab_size: int, buckets: int = DEFAULT_BUCKETS, prior_variance: float = 1.0) -> None:
        self.vocab_size = int(vocab_size)
        self.buckets = int(buckets)
        self.prior_variance = float(prior_variance)
        self.unigram = torch.zeros(self.vocab_size, dtype=torch.int64)
        self.bigram = torch.zeros(self.buckets, dtype=torch.int64)

    @classmethod
    def fitted(cls, data: FitData) -> TokenNovelty:
        """Counts of every training response; `prior_variance` = the variance of the trained mean reward over (up to
        `PRIOR_PAIRS`) training pairs' responses (1 when there is a single value)."""
        term = cls(data.vocab_size).fit(data.responses())
        means = data.pairs(PRIOR_PAIRS, False).means.to(torch.float64).flatten()
        term.prior_variance = float(means.var()) if means.numel() > 1 else 1.0
        return term

    def _pair_bucket(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a.long() * _HASH_MULT + b.long()) % self.buckets

    def fit(self, responses: Iterable[list[int]]) -> TokenNovelty:
        """Add the tokens and adjacent pairs of each response (a list of ids) to the counts."""
        for ids in responses:
            t = torch.as_tensor(list(ids), dtype=torch.long)
            t = t[(t >= 0) & (t < self.vocab_size)]
            if t.numel() == 0:
                continue
            self.unigram += torch.bincount(t, minlength=self.vocab_size)
            if t.numel() > 1:
                self.bigram += torch.bincount(self._pair_bucket(t[:-1], t[1:]), minlength=self.buckets)
        return self

    def novelty(self, response_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) ids and 0/1 mask -> (B,) fp32: unseen tokens + unseen adjacent pairs of each response."""
        ids = response_ids.detach().cpu().long()
        mask = response_mask.detach().cpu().bool()
        in_vocab = (ids >= 0) & (ids < self.vocab_size)
        seen = torch.zeros_like(mask)
        seen[in_vocab] = self.unigram[ids[in_vocab]] > 0
        unseen_tokens = (mask & ~seen).sum(dim=1)
        pair_mask = mask[:, 1:] & mask[:, :-1]
        pair_seen = self.bigram[self._pair_bucket(ids[:, :-1].clamp(min=0), ids[:, 1:].clamp(min=0))] > 0
        unseen_pairs = (pair_mask & ~pair_seen).sum(dim=1)
        return (unseen_tokens + unseen_pairs).float().to(response_ids.device)

    def variance(self, inputs: EpistemicInputs) -> torch.Tensor:
        """(B,) fp32 epistemic variance `prior_variance * novelty` of the responses in `inputs`."""
        return self.prior_variance * self.novelty(inputs.response_ids, inputs.response_mask)

    # ---- persistence ------------------------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        """What `heads_config.json` records under `epistemic`."""
        return {"kind": self.kind, "vocab_size": self.vocab_size, "buckets": self.buckets,
                "prior_variance": self.prior_variance}  # fmt: skip

    def save(self, output_dir: str) -> None:
        save_file({"unigram": self.unigram.contiguous(), "bigram": self.bigram.contiguous()},
                  os.path.join(output_dir, EPISTEMIC_WEIGHTS_NAME), metadata={"format": "pt"})  # fmt: skip

    @classmethod
    def load(cls, path: str, config: dict[str, Any]) -> TokenNovelty:
        """Read `epistemic.safetensors` at `path` with the settings `config` (from heads_config.json)."""
        try:
            tensors = load_file(path)
            model = cls(int(config["vocab_size"]), int(config["buckets"]), float(config["prior_variance"]))
        except (OSError, KeyError, ValueError, TypeError, RuntimeError) as e:
            raise CheckpointError(f"Cannot read the epistemic term {path!r}: {' '.join(str(e).split())}") from None
        for name in ("unigram", "bigram"):
            value = tensors.get(name)
            expected = getattr(model, name).shape
            if value is None or tuple(value.shape) != tuple(expected):
                raise CheckpointError(
                    f"{path!r}: `{name}` is missing or has the wrong shape (expected {tuple(expected)}); the file "
                    "does not match heads_config.json's `epistemic` settings."
                )
            setattr(model, name, value.long())
        return model
