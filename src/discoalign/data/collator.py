"""Batching tokenised pairwise rows: chosen and rejected sequences stacked into one padded batch."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import DataError
from ..losses.logps import IGNORE_INDEX
from .formats import GROUND_TRUTH_COLUMNS
from .packing import pack_pair_rows


class PairwiseCollator:
    """Collate B tokenised pairwise rows into tensors of 2B sequences.

    Rows 0..B-1 are prompt+chosen and rows B..2B-1 prompt+rejected (same order), so one forward pass scores
    both sides.

    Args:
        pad_token_id: id written on padding positions (they are masked out by `attention_mask` and `labels`).
        padding_side: "right" (default) or "left".
        pack_pairs: one row per pair instead (prompt once, then chosen, then rejected); the keys and shapes
            of that layout are those of `data.packing.pack_pair_rows`, plus margin and ground truth as below.

    Returns (from `__call__`), with T the longest prompt+response in the batch:
        input_ids (2B, T) long; attention_mask (2B, T) long (1 on real tokens);
        labels (2B, T) long: the token id on response positions, -100 on prompt and padding;
        prompt_last_index (2B,) long: position of the last prompt token of each sequence;
        margin (B,) float32; and, when every row has them, true_reward_chosen / true_reward_rejected /
        noise (B,) float32.
    """

    def __init__(self, pad_token_id: int, padding_side: str = "right", pack_pairs: bool = False) -> None:
        if pad_token_id is None:
            raise DataError(
                "The tokenizer has no pad token, so batches cannot be padded; set `tokenizer.pad_token` "
                "(for example to the EOS token) before building the PairwiseCollator."
            )
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        self.pad_token_id = int(pad_token_id)
        self.padding_side = padding_side
        # `pack_pairs`: one row per pair instead of two (see `data.packing`); set by the trainer from the config.
        self.pack_pairs = pack_pairs

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self._packed(rows) if self.pack_pairs else self._padded(rows)
        batch["margin"] = torch.tensor([float(r.get("margin") or 0.0) for r in rows], dtype=torch.float32)
        for column in GROUND_TRUTH_COLUMNS:
            if all(r.get(column) is not None for r in rows):
                batch[column] = torch.tensor([float(r[column]) for r in rows], dtype=torch.float32)
        return batch

    def _packed(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        triples = [(r["prompt_input_ids"], r["chosen_input_ids"], r["rejected_input_ids"]) for r in rows]
        return pack_pair_rows(triples, self.pad_token_id)

    def _padded(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        sequences = []  # (prompt_ids, response_ids) for chosen rows, then for rejected rows
        for side in ("chosen_input_ids", "rejected_input_ids"):
            sequences += [(list(r["prompt_input_ids"]), list(r[side])) for r in rows]
        width = max(len(p) + len(c) for p, c in sequences)
        n = len(sequences)
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((n, width), dtype=torch.long)
        labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
        prompt_last_index = torch.zeros(n, dtype=torch.long)
        for i, (prompt, response) in enumerate(sequences):
            length = len(prompt) + len(response)
            start = width - length if self.padding_side == "left" else 0
            input_ids[i, start : start + length] = torch.tensor(prompt + response, dtype=torch.long)
            attention_mask[i, start : start + length] = 1
            labels[i, start + len(prompt) : start + length] = torch.tensor(response, dtype=torch.long)
            prompt_last_index[i] = start + len(prompt) - 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "prompt_last_index": prompt_last_index,
        }
