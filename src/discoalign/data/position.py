"""Where a reward is read: the token a reward model was trained to score.

A reward model learns its score at the *last* token of prompt + response as `data.encode` tokenises training
pairs: the template's full turn, so with ChatML the response ends `<|im_end|>` `\\n` and the score is learned at
the `\\n`. A policy stops sampling at EOS (`<|im_end|>`), so a generated response must get the rest of the turn
(`turn_end_suffix`, computed once from the tokenizer) appended before it is scored, or the reward would be read
at a position the reward model never saw in training. With a template whose turn ends in EOS (or the plain
fallback template, after which EOS is appended) the suffix is empty and nothing changes.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .encode import tokenize_pair

_PROBE = {
    "prompt": [{"role": "user", "content": "Hello there."}],
    "chosen": [{"role": "assistant", "content": "Fine, thanks."}],
    "rejected": [{"role": "assistant", "content": "Fine, thanks."}],
}


def turn_end_suffix(tokenizer, stop_ids: Iterable[int] | None = None) -> list[int]:
    """Token ids the chat template emits after the stop token that ends an assistant turn ([] when none).

    Found by tokenising one probe conversation exactly as training tokenises a response (`tokenize_pair`) and
    taking what follows the last stop token (`stop_ids`, default the tokenizer's EOS).
    """
    stops = set(int(t) for t in stop_ids) if stop_ids is not None else set()
    if getattr(tokenizer, "eos_token_id", None) is not None:
        stops.add(int(tokenizer.eos_token_id))
    _, response, _ = tokenize_pair(tokenizer, _PROBE)
    last = max((i for i, t in enumerate(response) if t in stops), default=None)
    return [] if last is None else list(response[last + 1 :])


def append_turn_suffix(
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    ended: torch.Tensor,
    suffix: list[int],
    pad_token_id: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Append `suffix` right after the stop token of every response that ended, so the reward is read where
    the reward model was trained to read it.

    Args:
        response_ids, response_mask: (B, L) right-padded responses cut after their stop token (mask 1 on real
            tokens, any dtype).
        ended: (B,) bool, the row holds a stop token (rows cut off by `max_new_tokens` get no suffix: there is
            no turn end to complete).
        suffix: ids from `turn_end_suffix`.
        pad_token_id: written on the added columns of rows that get no suffix.
    Returns:
        ids (B, L + len(suffix)) and mask (B, L + len(suffix)) of the mask's dtype; unchanged when suffix is empty.
    """
    if not suffix:
        return response_ids, response_mask
    k = len(suffix)
    batch, length = response_ids.shape
    ids = torch.nn.functional.pad(response_ids, (0, k), value=int(pad_token_id))
    mask = torch.nn.functional.pad(response_mask, (0, k), value=0)
    lengths = response_mask.long().sum(dim=1)
    tail = torch.tensor(suffix, dtype=ids.dtype, device=ids.device)
    for row in torch.nonzero(ended.bool(), as_tuple=False).flatten().tolist():
        start = int(lengths[row])
        ids[row, start : start + k] = tail
        mask[row, start : start + k] = 1
    return ids, mask
