"""Scoring already-rendered texts (prompt + response as the policy's chat template wrote them) with a reward model."""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import torch

from ..config.schema import FinetuningArguments, ModelArguments
from ..data.position import turn_end_suffix
from ..errors import CheckpointError
from ..export.exporter import checkpoint_heads
from ..models.checkpoint import has_epistemic
from ..models.epistemic import EpistemicInputs
from ..models.heads import reward_heads
from ..models.loader import load_model_with_heads

logger = logging.getLogger(__name__)


class Query(list):
    """A query's token ids (a list), and where its response starts when the request said (else None)."""

    response_start: int | None = None


class RewardScorer:
    """A frozen reward model (ours, LlamaFactory/TRL value head, DiscoRM, seq-cls; LoRA or full) and its tokenizer.

    `score_ids` is the only method that runs the model; the server calls it from one worker thread.
    """

    def __init__(
        self, model_dir: str, disco_risk_coef: float = 0.0, dtype: str | None = None, device: str = "auto"
    ) -> None:

        if not os.path.isdir(model_dir):
            raise CheckpointError(f"--model {model_dir!r} is not a directory holding a reward model.")
        heads = checkpoint_heads(model_dir)
        if not heads["value_head"]:
            raise CheckpointError(
                f"--model {model_dir!r} has no value head, so it is not a reward model (an SFT, DPO "
                "or PPO policy?). Give the output of a `stage: rm` run, or a foreign reward model."
            )
        if disco_risk_coef < 0:
            raise CheckpointError(f"--disco-risk-coef is {disco_risk_coef}; it must be non-negative.")
        self.disco = bool(heads["variance_head"])
        self.model, self.tokenizer = load_model_with_heads(
            ModelArguments(model_name_or_path=model_dir), FinetuningArguments(stage="rm"),
            heads=reward_heads(self.disco), is_trainable=False, torch_dtype=dtype,
        )  # fmt: skip
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            self.model.to(torch.device(device))
        except (RuntimeError, AssertionError) as e:  # e.g. `cuda` on a machine without a GPU
            raise CheckpointError(f"--device {device!r} cannot hold the model: {' '.join(str(e).split())}") from None
        self.model.eval()
        self.model_dir = model_dir
        self.disco_risk_coef = disco_risk_coef
        self.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        # What the chat template writes after the turn's stop token (ChatML: "\n"): a text that ends on the stop
        # token, as a policy's generation does, gets it appended so the reward is read where training read it
        # (data/position.py; the same rule as PPO, `score` and `bon`).

        self.stop_id = self.tokenizer.eos_token_id
        self.turn_suffix = turn_end_suffix(self.tokenizer) if self.stop_id is not None else []

    @property
    def epistemic(self):
        """The reward model's epistemic estimator (`models.epistemic`), or None."""
        return self.model.epistemic if has_epistemic(self.model) else None

    def tokenize(self, texts: list[str], prompts: list[str] | None = None) -> list[Query]:
        """Token ids of each text as it is (no special tokens added: the policy's template already wrote them), plus
        the template's turn end after a final stop token. With `prompts` (OpenRLHF sends them) and an epistemic term,
        each query also records where its response starts: the epistemic term reads the response tokens only."""
        out = []
        for i, ids in enumerate(self.tokenizer(texts, add_special_tokens=False)["input_ids"]):
            query = Query(ids)
            if self.turn_suffix and query and query[-1] == self.stop_id:
                query += self.turn_suffix
            if prompts is not None and self.epistemic is not None:
                prompt_ids = self.tokenizer(prompts[i], add_special_tokens=False)["input_ids"]
                if 0 < len(prompt_ids) < len(query) and query[: len(prompt_ids)] == prompt_ids:
                    query.response_start = len(prompt_ids)
            out.append(query)
        return out

    @torch.no_grad()
    def score_ids(self, sequences: list[list[int]]) -> list[dict[str, float]]:
        """Score token sequences in one right-padded batch.

        Returns, per sequence: `mean`, `reward` (mean - disco_risk_coef * sqrt(variance) for a Disco model, else the
        mean) and, for a Disco model, `variance`.
        """
        width = max(len(ids) for ids in sequences)
        input_ids = torch.full((len(sequences), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, ids in enumerate(sequences):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
        device = self.model.device
        estimator = self.epistemic
        scored = self.model.score_detailed(input_ids.to(device), attention_mask.to(device), with_variance=self.disco,
                                           with_features=estimator is not None and estimator.needs_features)  # fmt: skip
        mean, variance = scored.mean, scored.variance
        epistemic = self._epistemic(sequences, scored.features)
        out: list[dict[str, Any]] = []
        for row in range(len(sequences)):
            item = {"mean": float(mean[row])}
            total = 0.0
            if variance is not None:
                item["aleatoric_variance"] = float(variance[row])
                total += item["aleatoric_variance"]
            if epistemic is not None and epistemic[row] is not None:
                item["epistemic_variance"] = epistemic[row]
                total += epistemic[row]
            reward = item["mean"]
            if len(item) > 1:  # the total variance of whatever parts the model has, as `score` reports it
                item["variance"] = total
                reward -= self.disco_risk_coef * math.sqrt(total)
            item["reward"] = reward
            out.append(item)
        return out

    def _epistemic(self, sequences: list[list[int]], features: torch.Tensor | None) -> list[float | None] | None:
        """Epistemic variance of each query whose response start is known (see `tokenize`); None without the term.
        `features`: (N, H) the pooled features of the scoring pass, for an estimator that reads them."""
        term = self.epistemic
        if term is None:
            return None
        spans = [(row, seq[seq.response_start :]) for row, seq in enumerate(sequences)
                 if getattr(seq, "response_start", None) is not None]  # fmt: skip
        out: list[float | None] = [None] * len(sequences)
        if spans:
            width = max(len(ids) for _, ids in spans)
            ids = torch.full((len(spans), width), self.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(spans), width), dtype=torch.long)
            for i, (_, response) in enumerate(spans):
                ids[i, : len(response)] = torch.tensor(response, dtype=torch.long)
                mask[i, : len(response)] = 1
            rows = [row for row, _ in spans]
            values = term.variance(EpistemicInputs(ids, mask, None if features is None else features[rows]))
            for i, (row, _) in enumerate(spans):
                out[row] = float(values[i])
        return out
