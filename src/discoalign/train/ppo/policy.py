"""The PPO policy: a `ModelWithHeads` whose forward also returns, for each response token, the log-prob of the
sampled token and the critic's value.

Computing them *inside* the forward matters under DDP (and every engine that wraps the module): the LM head
and the value head must be used in the wrapped forward, or the engine's gradient bookkeeping breaks ("mark a
variable ready only once"). Parameter names, checkpoints and everything else are those of `ModelWithHeads`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ...models.model_with_heads import ModelWithHeads
from .rollout import response_hidden, token_logprobs


@dataclass
class PolicyOutput:
    """What `PPOPolicy.forward` returns for prompt + response batches (B rows, L response positions).

    logprobs: (B, L) fp32 log pi(y_t | x, y_<t) at the sampling temperature.
    values: (B, L) fp32 V(x, y_<t), or None (no value head, or not asked for).
    entropy: (B, L) fp32 entropy of each position's distribution (no gradient), or None.
    prompt_hidden: (B, H) the hidden state at the last prompt token (position P-1), for the beta head.
    beta_scale: (B,) s(x) of the beta head, when `prompt_features` were given.
    """

    logprobs: torch.Tensor
    values: torch.Tensor | None
    entropy: torch.Tensor | None
    prompt_hidden: torch.Tensor
    beta_scale: torch.Tensor | None = None


class PPOPolicy(ModelWithHeads):
    """`ModelWithHeads` plus a response-scoring forward (see the module docstring)."""

    @classmethod
    def from_model(cls, model: ModelWithHeads) -> PPOPolicy:
        """The same modules (shared, not copied) under this class."""
        policy = cls(model.backbone, model.heads, model.heads_config, model.modality)
        policy.media_processor = model.media_processor
        policy.epistemic = model.epistemic
        return policy.train(model.training)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        response_ids: torch.Tensor | None = None,
        prompt_length: int | None = None,
        temperature: float = 1.0,
        with_values: bool = True,
        with_entropy: bool = False,
        prompt_features: torch.Tensor | None = None,
        **kwargs: Any,
    ):
        """Without `response_ids`: `ModelWithHeads.forward`. With them:

        Args:
            input_ids, attention_mask: (B, P + L) left-padded prompts followed by right-padded responses.
            response_ids: (B, L) the response tokens (the last L columns of input_ids).
            prompt_length: P.
            temperature: the sampling temperature (logits are divided by it).
            with_values: read the value head at every response position.
            with_entropy: also return per-position entropies.
            prompt_features: (B, H) reference prompt states for the beta head, or None.
        Returns:
            PolicyOutput.
        """
        if response_ids is None:
            return super().forward(input_ids, attention_mask, prompt_features=prompt_features, **kwargs)
        out = super().forward(input_ids, attention_mask, with_heads=False, prompt_features=prompt_features, **kwargs)
        hidden = response_hidden(out.last_hidden_state, prompt_length)
        softcap = self.final_logit_softcap
        logprobs, entropy = token_logprobs(hidden, self.lm_head, response_ids, temperature, softcap, with_entropy)
        values = self.value_head(hidden) if (with_values and self.value_head is not None) else None
        return PolicyOutput(logprobs, values, entropy, out.last_hidden_state[:, prompt_length - 1], out.beta_scale)
