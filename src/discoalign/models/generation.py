"""Sampling responses from a causal LM: the ids that end a response, sampling, and cutting each row after its first
stop token. Used by PPO rollouts (`train/ppo/collect.py`) and best-of-n (`eval/bon.py`)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def stop_token_ids(tokenizer, generation_config=None) -> list[int]:
    """Ids that end a response: the tokenizer's EOS and every EOS of the model's generation config."""
    ids: list[int] = []
    for source in (getattr(tokenizer, "eos_token_id", None), getattr(generation_config, "eos_token_id", None)):
        for token in source if isinstance(source, (list, tuple)) else [source]:
            if token is not None and int(token) not in ids:
                ids.append(int(token))
    return ids


def truncate_at_stop(
    responses: torch.Tensor, stop_ids: Iterable[int], pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut each generated row after its first stop token.

    The end is found from the first stop token, never from pad ids, so pad == EOS works: the EOS that ends a
    response is kept and everything after it becomes padding.

    Args:
        responses: (B, L) generated ids (prompt removed).
        stop_ids: ids that end a response.
        pad_token_id: id written on the cut-off positions.
    Returns:
        responses (B, L) with padding after the stop token, mask (B, L) fp32 (1 up to and including the stop
        token; all ones for a row that never stopped), ended (B,) bool.
    """
    is_stop = torch.zeros_like(responses, dtype=torch.bool)
    for token in stop_ids:
        is_stop |= responses == token
    ended = is_stop.any(dim=1)
    length = responses.shape[1]
    first_stop = torch.where(ended, is_stop.float().argmax(dim=1), torch.full_like(ended, length - 1, dtype=torch.long))
    positions = torch.arange(length, device=responses.device).expand_as(responses)
    mask = positions <= first_stop.unsqueeze(1)
    return responses.masked_fill(~mask, int(pad_token_id)), mask.float(), ended


@torch.no_grad()
def sample_responses(
    policy: nn.Module, query_ids: torch.Tensor, query_mask: torch.Tensor, generation_config
) -> torch.Tensor:
    """Sample responses from the policy's causal LM (LoRA adapters active). Returns (B, L_gen) ids, prompt removed.

    `policy` is the unwrapped `ModelWithHeads`; the caller puts it in eval mode.
    """
    output = policy.backbone.generate(
        input_ids=query_ids, attention_mask=query_mask, generation_config=generation_config
    )
    return output[:, query_ids.shape[1] :]
