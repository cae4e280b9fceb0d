"""Pair packing: one row per preference pair, the prompt computed once, chosen and rejected side by side.

The plain layout runs prompt+chosen and prompt+rejected as two padded rows, so every prompt token goes through
the model twice and the shorter side is padded to the longer. A packed row holds

    [ prompt[:-1] | prompt[-1], chosen | prompt[-1], rejected | padding ]
      segment 0     segment 1            segment 2             -1

with per-sequence position ids (prompt 0..P-2, each response segment restarting at P-1) and an attention mask
in which a token sees the shared prompt and, causally, its own segment only. The last prompt token is repeated
at the head of each response segment: in the plain layout its hidden state predicts the first response token,
and it must not see the other response. Every real token therefore sees exactly the context it sees in the
plain layout, at the same positions, so hidden states, log-probs, scores and losses are the same; only the
prompt is computed once. The mask is an arbitrary (not block-causal) pattern, which `eager` and `sdpa` attention
take and flash-attention kernels do not (`config.attention`); the model side (the mask, and switching sdpa models
to a segment-aware sdpa that skips the masked blocks) is `models.pair_attention`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..losses.logps import IGNORE_INDEX

SHARED, CHOSEN, REJECTED, PADDING = 0, 1, 2, -1
# Batch keys only a packed batch has; a trainer passes them on to the model.
PACKED_MODEL_INPUTS = ("position_ids", "segment_ids", "pair_segments", "score_index")


def packed_row_length(prompt_len: int, chosen_len: int, rejected_len: int) -> int:
    """Length of one packed pair row: the prompt once, its last token repeated before the second response."""
    return prompt_len + chosen_len + rejected_len + 1


def pack_pair_rows(
    pairs: Sequence[tuple[Sequence[int], Sequence[int], Sequence[int]]], pad_token_id: int
) -> dict[str, torch.Tensor]:
    """Pack B (prompt_ids, chosen_ids, rejected_ids) triples into B rows (see the module docstring).

    Returns, with L the longest packed row:
        input_ids (B, L) long; attention_mask (B, L) long, 1 on real tokens (for counting; the model gets the
        4-D mask built from segment_ids);
        position_ids (B, L) long; segment_ids (B, L) long: 0 shared prompt, 1 chosen, 2 rejected, -1 padding;
        labels (2B, L) long: row b holds pair b's chosen tokens at their positions, row B+b its rejected tokens,
        -100 elsewhere (so the usual shift-by-one log-prob code applies to the (B, L) hidden states);
        prompt_last_index (2B,) long: position of the last prompt token seen by each response (the copy heading
        its segment), for the beta head;
        score_index (2B,) long: flat index into (B * L) of each sequence's last token, chosen rows first, for
        the reward / variance heads;
        pair_segments (B, 3) long: the lengths of each row's shared, chosen and rejected segments (for the
        segment-aware attention of `models.pair_attention`).
    """
    if any(len(prompt) < 1 for prompt, _, _ in pairs):
        raise ValueError("pair packing needs at least one prompt token per pair")
    n = len(pairs)
    width = max(packed_row_length(len(p), len(c), len(r)) for p, c, r in pairs)
    input_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    position_ids = torch.zeros((n, width), dtype=torch.long)
    segment_ids = torch.full((n, width), PADDING, dtype=torch.long)
    labels = torch.full((2 * n, width), IGNORE_INDEX, dtype=torch.long)
    prompt_last_index = torch.zeros(2 * n, dtype=torch.long)
    score_index = torch.zeros(2 * n, dtype=torch.long)
    pair_segments = torch.zeros((n, 3), dtype=torch.long)
    for b, (prompt, chosen, rejected) in enumerate(pairs):
        shared = len(prompt) - 1
        input_ids[b, :shared] = torch.tensor(list(prompt[:-1]), dtype=torch.long)
        position_ids[b, :shared] = torch.arange(shared)
        segment_ids[b, :shared] = SHARED
        start = shared
        for side, (segment, response) in enumerate(((CHOSEN, chosen), (REJECTED, rejected))):
            tokens = [prompt[-1], *response]
            end = start + len(tokens)
            input_ids[b, start:end] = torch.tensor(tokens, dtype=torch.long)
            position_ids[b, start:end] = torch.arange(shared, shared + len(tokens))
            segment_ids[b, start:end] = segment
            labels[side * n + b, start + 1 : end] = torch.tensor(list(response), dtype=torch.long)
            prompt_last_index[side * n + b] = start
            score_index[side * n + b] = b * width + end - 1
            pair_segments[b, 1 + side] = len(tokens)
            start = end
        pair_segments[b, 0] = shared
        attention_mask[b, :start] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "segment_ids": segment_ids,
        "labels": labels,
        "prompt_last_index": prompt_last_index,
        "score_index": score_index,
        "pair_segments": pair_segments,
    }


def packed_model_inputs(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The packed-layout keys of a batch that the model's forward takes (empty for a plain batch)."""
    return {k: batch[k] for k in PACKED_MODEL_INPUTS if k in batch}


def pair_row_lengths(dataset, packed: bool) -> list[int]:
    """Per pair, the row length its batch pads to: P + max(C, R) plain, or the packed row length.

    Used by length-grouped sampling (`group_by_length`), which batches pairs of similar length to cut padding.
    """
    prompts = dataset["prompt_input_ids"]
    chosen = dataset["chosen_input_ids"]
    rejected = dataset["rejected_input_ids"]
    if packed:
        return [packed_row_length(len(p), len(c), len(r)) for p, c, r in zip(prompts, chosen, rejected)]
    return [len(p) + max(len(c), len(r)) for p, c, r in zip(prompts, chosen, rejected)]
