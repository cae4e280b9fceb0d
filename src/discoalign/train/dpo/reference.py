"""What DPO reads from the reference model: its log-probs (live or precomputed as dataset columns) and the beta
head's features of each prompt."""

from __future__ import annotations

from typing import Any

import torch

from ...models.heads import pool_prompt
from ..distributed import gather_rows

# Dataset columns written by `add_reference_columns`, read back by `ReferenceColumnsCollator`.
REF_CHOSEN = "ref_chosen_logps"
REF_REJECTED = "ref_rejected_logps"
REF_PROMPT_HIDDEN = "ref_prompt_hidden"
REFERENCE_COLUMNS = (REF_CHOSEN, REF_REJECTED, REF_PROMPT_HIDDEN)


class ReferenceColumnsCollator:
    """Wraps the pairwise collator: precomputed reference columns become (B,) / (B, H) fp32 tensors."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        extra = {k: [row[k] for row in rows] for k in REFERENCE_COLUMNS if k in rows[0]}
        batch = self.inner([{k: v for k, v in row.items() if k not in extra} for row in rows])
        for key, values in extra.items():
            batch[key] = torch.tensor(values, dtype=torch.float32)
        return batch


def prompt_features(
    hidden: torch.Tensor, attention_mask: torch.Tensor, prompt_last_index: torch.Tensor, pooling: str
) -> torch.Tensor:
    """The beta head's reference features of each pair's prompt.

    Args:
        hidden: (N, T, H) reference hidden states of the batch; its first B rows hold each pair's prompt (the chosen
            rows of the plain layout, or the packed rows of `pack_pairs`, which start with the shared prompt).
        attention_mask: (N, T) 0/1.
        prompt_last_index: (B,) position of each pair's last prompt token in those rows.
        pooling: ``last`` (the hidden state at the last prompt token) or ``mean`` (the mean over the prompt's tokens:
            real tokens up to and including the last prompt token; with packing that is the shared prompt plus the
            copy of its last token heading the chosen segment).
    Returns:
        (B, H) fp32.
    """
    return pool_prompt(hidden, attention_mask, prompt_last_index, pooling)


def add_reference_columns(
    dataset, outputs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]], hidden_size: int | None
):
    """`dataset` with the reference columns, from this rank's outputs over its contiguous shard of the rows.

    Args:
        dataset: the whole (N rows) `datasets.Dataset`; reference columns it already has are replaced.
        outputs: per batch of this rank's shard, in order, `DPOTrainer.reference_forward`'s (ref_chosen_logps (b,),
            ref_rejected_logps (b,), ref_prompt_hidden (b, H) or None).
        hidden_size: H when the beta features are wanted, else None.
    Every rank gets every row back, in dataset order (`gather_rows`).
    """
    n = len(dataset)
    columns = {REF_CHOSEN: 0, REF_REJECTED: 1, **({REF_PROMPT_HIDDEN: 2} if hidden_size is not None else {})}
    dataset = dataset.remove_columns([c for c in REFERENCE_COLUMNS if c in dataset.column_names])
    for column, i in columns.items():
        empty = torch.zeros(0) if i < 2 else torch.zeros(0, hidden_size)
        local = torch.cat([out[i] for out in outputs]) if outputs else empty
        dataset = dataset.add_column(column, gather_rows(local, n).tolist())
    return dataset
