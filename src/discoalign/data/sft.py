"""Supervised fine-tuning rows: conversion of one raw row to prompt + response, tokenisation, batching.

Canonical SFT row::

    {"prompt": [messages...], "response": [{"role": "assistant", "content": str}], ...passthrough}

Sources (`formats.detect_format` names them):

* prompt-style files (`prompt` format): alpaca `instruction` (+ `input`) with `output` (or `response`), or a
  `messages` / `conversations` list whose last turn is the assistant's; earlier turns are the prompt
  (multi-turn data trains the last assistant turn, LlamaFactory's `mask_history: true`);
* pairwise files: the chosen response (`sft_responses: chosen`), or chosen and rejected as two rows
  (`sft_responses: both`: a format warm-up that learns no preference).

Token ids are computed as for a pair (`encode.tokenize_pair`): the response is what the chat template adds
after the generation prompt, EOS included. Labels are the response ids; prompt tokens are masked (-100).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..errors import DataError
from ..losses.logps import IGNORE_INDEX
from .checks import (
    EMPTY_RESPONSE,
    MALFORMED,
    MISSING,
    WRONG_TYPE,
    RowProblem,
    as_messages,
    check_prompt,
    optional_str,
    require_str,
    with_system,
)
from .encode import tokenize_pair, truncate_pair
from .formats import PAIRWISE_CONVERTERS, PROMPT_PASSTHROUGH, _passthrough

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

RESPONSE_COLUMNS = ("output", "response", "completion")


def _prompt_style(row: dict[str, Any]) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(prompt, [response]) of an alpaca / messages / prompt+completion row."""
    if "instruction" in row or "prompt" in row:
        if "instruction" in row:
            instruction, extra = require_str(row, "instruction"), optional_str(row, "input")
            prompt = [{"role": "user", "content": f"{instruction}\n\n{extra}" if extra else instruction}]
        else:
            prompt = as_messages(row["prompt"], "prompt", default_role="user")
        column = next((c for c in RESPONSE_COLUMNS if row.get(c) is not None), None)
        if column is None:
            raise RowProblem(MISSING, "output", "SFT needs the response: an `output` (alpaca), `response` or "
                                                "`completion` field")  # fmt: skip
        response = as_messages(row[column], column, default_role="assistant")
        return prompt, response
    field = "messages" if "messages" in row else "conversations"
    messages = as_messages(row.get(field), field)
    if len(messages) < 2 or messages[-1]["role"] != "assistant":
        raise RowProblem(MALFORMED, field, "SFT needs a conversation ending with an assistant turn (the response)")
    return messages[:-1], messages[-1:]


def to_sft_rows(row: Any, fmt: str, responses: str = "chosen") -> list[dict[str, Any]]:
    """Convert and check one raw row: one SFT row, or two (`responses: both`, pairwise data). Raises RowProblem."""
    if not isinstance(row, dict):
        raise RowProblem(WRONG_TYPE, "(row)", f"expected an object with named fields, got {type(row).__name__}")
    extra = _passthrough(row, PROMPT_PASSTHROUGH)
    if fmt == "prompt":
        prompt, response = _prompt_style(row)
        prompt = with_system(prompt, optional_str(row, "system"))
        pairs = [(prompt, response)]
    else:
        pair = PAIRWISE_CONVERTERS[fmt](row)
        sides = ("chosen", "rejected") if responses == "both" else ("chosen",)
        pairs = [(pair["prompt"], pair[side]) for side in sides]
    out = []
    for prompt, response in pairs:
        check_prompt(prompt)
        if not response or not any(m["content"].strip() for m in response):
            raise RowProblem(EMPTY_RESPONSE, "response", "the response is empty")
        out.append({"prompt": prompt, "response": response, **extra})
    return out


def encode_sft(tokenizer: PreTrainedTokenizerBase, row: dict[str, Any], cutoff_len: int) -> dict[str, Any] | None:
    """A tokenised SFT row (`prompt_input_ids`, `response_input_ids` + the row's fields), or None when
    `cutoff_len` leaves no room for a response token. The prompt is cut from the left, the response from the right."""
    prompt_ids, response_ids, _ = tokenize_pair(
        tokenizer, {"prompt": row["prompt"], "chosen": row["response"], "rejected": row["response"]}
    )
    prompt_ids, response_ids, _ = truncate_pair(prompt_ids, response_ids, response_ids, cutoff_len)
    if not response_ids:
        return None
    return {**row, "prompt_input_ids": prompt_ids, "response_input_ids": response_ids}


class SFTCollator:
    """Batch B tokenised SFT rows.

    Padded (default): input_ids, attention_mask, labels (B, T) long, right padding; labels hold the response ids
    and -100 on prompt and padding (transformers' causal-LM convention: position t is predicted from t - 1).

    `packing=True`: the B sequences laid end to end in one row (1, L), L = their total length, plus
    position_ids (1, L) restarting at 0 per sequence and segment_ids (1, L) numbering them 1..B; the model's
    mask (`models.pair_attention.pair_attention_mask`) then lets a token see its own sequence only, so each token's
    hidden state and loss are those of the padded layout. Every sequence starts with a prompt token (label
    -100), so no token is scored across a boundary.
    """

    def __init__(self, pad_token_id: int | None, packing: bool = False) -> None:
        if pad_token_id is None:
            raise DataError(
                "The tokenizer has no pad token, so SFT batches cannot be padded; set `tokenizer.pad_token`."
            )
        self.pad_token_id = int(pad_token_id)
        self.packing = packing

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        sequences = [(list(r["prompt_input_ids"]), list(r["response_input_ids"])) for r in rows]
        if self.packing:
            return self._packed(sequences)
        width = max(len(p) + len(r) for p, r in sequences)
        n = len(sequences)
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((n, width), dtype=torch.long)
        labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
        for i, (prompt, response) in enumerate(sequences):
            length = len(prompt) + len(response)
            input_ids[i, :length] = torch.tensor(prompt + response, dtype=torch.long)
            attention_mask[i, :length] = 1
            labels[i, len(prompt) : length] = torch.tensor(response, dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    @staticmethod
    def _packed(sequences: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        ids, labels, positions, segments = [], [], [], []
        for index, (prompt, response) in enumerate(sequences, start=1):
            ids += prompt + response
            labels += [IGNORE_INDEX] * len(prompt) + response
            positions += list(range(len(prompt) + len(response)))
            segments += [index] * (len(prompt) + len(response))
        as_row = lambda values: torch.tensor([values], dtype=torch.long)  # noqa: E731
        return {
            "input_ids": as_row(ids),
            "attention_mask": torch.ones((1, len(ids)), dtype=torch.long),
            "labels": as_row(labels),
            "position_ids": as_row(positions),
            "segment_ids": as_row(segments),
        }
