"""Rollouts: sampling responses to left-padded prompts, cutting them at the first stop token, and reading
per-token log-probs and values of the sampled tokens.

Layout of one rollout batch (B rows, prompts padded on the left to P tokens, responses on the right to L):

    position:   0 ........ P-1 | P ............. P+L-1
    tokens:     pad.. prompt    | y_0 y_1 .. EOS pad ..
    mask:       0..0  1 ... 1   | 1   1  ..  1   0 ...

The hidden state at position P-1+t is the state *before* response token t: it gives log pi(y_t | x, y_<t)
through the LM head and the critic's value V(x, y_<t) through the value head; the one at P-1 (the last prompt
token of every row) also feeds the beta head.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import nn

from ...losses.logps import softcap


@dataclass
class Rollout:
    """One batch of experience; every tensor's first dimension is the row. Masks are fp32 0/1.

    query_ids, query_mask: (B, P) left-padded prompts.
    response_ids, response_mask: (B, L) sampled responses, cut after the first stop token and right-padded.
    logprobs, ref_logprobs, values: (B, L) fp32 at sampling time (0 on padding); ref_logprobs None without a
        reference (GRPO, `beta: 0`), values None without a critic (GRPO).
    reward_mean: (B,) the reward model's mean, or None (GRPO with reward functions only); reward_variance: (B,)
        or None (scalar reward model).
    scores: (B,) the sequence reward PPO maximises (after risk adjustment, clipping and the missing-EOS penalty).
    ended: (B,) bool, the response stopped on its own (holds a stop token).
    kl_coef: (B,) the KL coefficient of each prompt (pref_beta, or pref_beta * s(x)).
    ref_prompt_hidden: (B, H) fp32 reference hidden state at the last prompt token, or None.
    kl, rewards, advantages, returns: (B, L) fp32, filled by `finish_rollout` in the trainer.
    """

    query_ids: torch.Tensor
    query_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor | None
    values: torch.Tensor | None
    reward_mean: torch.Tensor | None
    reward_variance: torch.Tensor | None
    scores: torch.Tensor
    ended: torch.Tensor
    kl_coef: torch.Tensor
    ref_prompt_hidden: torch.Tensor | None = None
    kl: torch.Tensor | None = None
    rewards: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.query_ids.shape[0]

    def select(self, index: torch.Tensor) -> Rollout:
        """The rows at `index` ((n,) long), every tensor indexed alike."""
        picked = {}
        for f in fields(self):
            value = getattr(self, f.name)
            picked[f.name] = value[index] if isinstance(value, torch.Tensor) else value
        return Rollout(**picked)

    @property
    def input_ids(self) -> torch.Tensor:
        """(B, P + L) prompt and response."""
        return torch.cat([self.query_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        """(B, P + L) long, 1 on real prompt and response tokens."""
        return torch.cat([self.query_mask, self.response_mask.long()], dim=1)


def pad_columns(tensors: list[torch.Tensor], value: float) -> list[torch.Tensor]:
    """Right-pad (n_i, L_i) tensors to the widest L so they can be concatenated along rows."""
    width = max(t.shape[1] for t in tensors)
    return [torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value) for t in tensors]


def response_hidden(hidden: torch.Tensor, prompt_length: int) -> torch.Tensor:
    """hidden: (B, P + L, H) -> (B, L, H), the state before each response token (positions P-1 .. P+L-2)."""
    return hidden[:, prompt_length - 1 : -1]


def token_logprobs(
    hidden: torch.Tensor,
    lm_head: nn.Module,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    final_logit_softcapping: float | None = None,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(token | state) from hidden states, in fp32, with logits divided by the sampling temperature.

    Args:
        hidden: (B, L, H) the states before each token (see `response_hidden`).
        lm_head: the output embedding.
        tokens: (B, L) long.
        temperature: the sampling temperature (the policy that sampled is softmax(logits / temperature)).
        final_logit_softcapping: the model's final logit soft-cap (Gemma 2), or None.
        with_entropy: also return the entropy of each token's full distribution.
    Returns:
        logprobs (B, L) fp32 and entropy (B, L) fp32 or None.
    """
    # Contiguous input: a strided slice can take another matmul kernel whose rounding then depends on whether the
    # weight requires grad, and the policy and its frozen copy would disagree (a KL of 1e-7 at step 0).
    logits = softcap(lm_head(hidden.contiguous()).float(), final_logit_softcapping) / temperature
    log_norm = torch.logsumexp(logits, dim=-1)
    logprobs = torch.gather(logits, -1, tokens.unsqueeze(-1)).squeeze(-1) - log_norm
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = log_norm - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    return logprobs, entropy
