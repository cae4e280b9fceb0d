"""Stage `kto` rows: one completion per row with a desirable / undesirable label (docs/kto.md).

Canonical KTO row (an SFT row plus its label)::

    {"prompt": [messages...], "response": [{"role": "assistant", "content": str}], "label": bool}

Sources:

* LlamaFactory's layout: `messages` (or `conversations`) ending with the assistant's turn, plus a boolean `label`;
  through a `dataset_info.json` entry the label column is the one its `columns` map `kto_tag` to;
* TRL's unpaired layout: `prompt`, `completion` (strings or message lists) and a boolean `label`;
* any pairwise file (prompt / chosen / rejected, sharegpt, ...): unpaired as TRL does, each pair giving a desirable
  row (the chosen response) and an undesirable one (the rejected response).

Token ids are an SFT row's (`sft.encode_sft`). The batch (`KTOCollator`) also holds, for the reference point, each
prompt with the previous row's completion (TRL's rotation by one within the batch).
"""

from __future__ import annotations

from typing import Any

import torch

from .checks import MISSING, WRONG_TYPE, RowProblem
from .collator import PairwiseCollator
from .formats import PAIRWISE_CONVERTERS
from .sft import to_sft_rows

LABEL = "label"


def _label(row: dict[str, Any]) -> bool:
    if row.get(LABEL) is None:
        why = "the value is null" if LABEL in row else "the row has no such field"
        raise RowProblem(MISSING, LABEL, f"{why}; KTO needs each completion's label: true (desirable) or false "
                                         "(undesirable), LlamaFactory's `kto_tag` column")  # fmt: skip
    if not isinstance(row[LABEL], bool):
        raise RowProblem(WRONG_TYPE, LABEL, f"expected true or false, got {type(row[LABEL]).__name__} "
                                            f"{row[LABEL]!r}")  # fmt: skip
    return row[LABEL]


def to_kto_rows(row: Any, fmt: str) -> list[dict[str, Any]]:
    """Convert and check one raw row: one KTO row, or two (a pair, unpaired). Raises RowProblem."""
    if not isinstance(row, dict):
        raise RowProblem(WRONG_TYPE, "(row)", f"expected an object with named fields, got {type(row).__name__}")
    if fmt in PAIRWISE_CONVERTERS:
        both = to_sft_rows(row, fmt, responses="both")  # checked like SFT's rows: prompt, non-empty responses
        return [{**both[0], LABEL: True}, {**both[1], LABEL: False}]
    label = _label(row)
    return [{**to_sft_rows(row, fmt)[0], LABEL: label}]  # prompt and response checked as SFT's, bad fields named


class KTOCollator:
    """Batch B tokenised KTO rows as one (2B, T) pairwise batch (`collator.PairwiseCollator`'s layout):

    rows [0, B): prompt_i + completion_i, the completions the loss scores;
    rows [B, 2B): prompt_i + completion_{i-1} (row 0 takes the last row's), the mismatched pairs of the reference
        point z0, as TRL builds them; that completion is cut from the right so the row fits in `cutoff_len`;
    kto_label (B,) bool: the rows' labels.
    """

    def __init__(self, pad_token_id: int, cutoff_len: int) -> None:
        self.inner = PairwiseCollator(pad_token_id)
        self.cutoff_len = cutoff_len

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        pairs = []
        for i, row in enumerate(rows):
            prompt = list(row["prompt_input_ids"])
            mismatched = list(rows[i - 1]["response_input_ids"])[: max(1, self.cutoff_len - len(prompt))]
            pairs.append({"prompt_input_ids": prompt, "chosen_input_ids": list(row["response_input_ids"]),
                          "rejected_input_ids": mismatched})  # fmt: skip
        batch = self.inner(pairs)
        batch.pop("margin", None)
        batch["kto_label"] = torch.tensor([bool(row[LABEL]) for row in rows], dtype=torch.bool)
        return batch
