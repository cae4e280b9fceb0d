"""`discoalign score`: score every response of a file with a trained reward model.

Two kinds of rows are accepted (detected from the columns):

* **prompt + response** (one response per row, e.g. best-of-n candidates): `prompt` (string or messages, optional
  `system`) with `response` / `completion` / `output`; LlamaFactory's alpaca `instruction` (+ `input`) + `output`;
  or `messages` / `conversations` whose last turn is the assistant's;
* **pairwise** rows in any preference format `stage: rm` reads (both chosen and rejected are scored).

Every response is tokenised exactly as reward-model training tokenises it (`data.encode`), so the score is read at
the position the model was trained on (the template's full turn end, e.g. ChatML's `<|im_end|>\\n`).

Per response the output line holds `mean`, and when the model has them `aleatoric_variance` (Disco head),
`epistemic_variance` (`epistemic: token_novelty`), `variance` = their sum and `sigma` = its square root.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config.schema import DataArguments, FinetuningArguments, ModelArguments
from ..data import get_dataset
from ..data.checks import EMPTY_RESPONSE, MALFORMED, TRUNCATED, WRONG_TYPE, RowProblem, as_messages, require
from ..data.encode import tokenize_pair, truncate_pair
from ..data.formats import to_prompt_row
from ..data.pipeline import SCORING
from ..data.prompts import left_pad
from ..data.registry import read_dataset
from ..data.sources import UnreadableLine, read_spec, split_specs
from ..errors import CheckpointError, DataError
from ..models.heads import reward_heads
from ..models.loader import load_model_with_heads
from ..models.reward_model import check_reward_heads, score_responses_detailed

logger = logging.getLogger(__name__)

RESPONSE_COLUMNS = ("response", "completion", "output")
PAIR_COLUMNS = ("chosen", "rejected")


@dataclass
class ScoreSummary:
    """What `score_file` did: lines written, rows read, rows skipped per reason."""

    written: int
    rows: int
    skipped: dict[str, int] = field(default_factory=dict)
    kind: str = "pairwise"


def check_reward_model_dir(model_dir: str, what: str = "`--model {}`") -> bool:
    """Refuse a folder that holds no trained reward head (before any model loads); return has-variance-head.

    Finds every variance layout the loader imports: ours (`heads.safetensors`), the DiscoRM fork's
    `var_head.var.*` inside `value_head.safetensors` or the model weights.
    """

    if not os.path.isdir(model_dir):
        raise CheckpointError(f"{what.format(repr(model_dir))} is not a directory holding a reward model.")
    _, has_variance = check_reward_heads(model_dir, what)
    return has_variance


def is_prompt_response(columns: list[str]) -> bool:
    """True for prompt + response rows, False for pairwise preference rows."""
    if any(c in columns for c in PAIR_COLUMNS):
        return False
    return any(c in columns for c in RESPONSE_COLUMNS) or any(c in columns for c in ("messages", "conversations"))


def to_prompt_response(row: Any) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(prompt messages, [assistant response]) of one prompt + response row; RowProblem when it does not fit."""

    if not isinstance(row, dict):
        raise RowProblem(WRONG_TYPE, "(row)", f"expected an object with named fields, got {type(row).__name__}")
    key = next((k for k in RESPONSE_COLUMNS if k in row), None)
    if key is not None:
        value = require(row, key)
        response = as_messages([value] if isinstance(value, dict) else value, key, default_role="assistant")
        prompt = to_prompt_row({k: v for k, v in row.items() if k != key}, "prompt")["prompt"]
    else:
        key = "messages" if "messages" in row else "conversations"
        messages = as_messages(require(row, key), key)
        if not messages or messages[-1]["role"] != "assistant":
            raise RowProblem(MALFORMED, key, "the last turn must be the assistant's response to score")
        response = messages[-1:]
        prompt = to_prompt_row(row, "prompt")["prompt"]
    if len(response) != 1 or response[0]["role"] != "assistant":
        raise RowProblem(MALFORMED, key, "the response must be one assistant message")
    if not response[0]["content"].strip():
        raise RowProblem(EMPTY_RESPONSE, key, "the response is empty")
    return prompt, response


def read_prompt_response_rows(
    data_path: str, skip_invalid_rows: bool
) -> tuple[list[dict[str, Any]], Counter, int, bool]:
    """Canonical prompt + response rows of a file (`prompt`, `response`, `index`, passthrough scalars).

    Returns (rows, skipped per reason, rows read, whether the file holds prompt + response rows at all). Stops at
    the first bad row with a DataError naming file, row and field, unless `skip_invalid_rows`.
    """

    sources = read_spec(data_path, 2000, 0)
    columns = [c for s in sources for c in s.columns]
    if not is_prompt_response(columns):
        return [], Counter(), 0, False
    rows: list[dict[str, Any]] = []
    skipped: Counter = Counter()
    total = 0
    for source in sources:
        for i, raw in enumerate(source.rows):
            total += 1
            try:
                prompt, response = to_prompt_response(raw)
            except RowProblem as problem:
                if not skip_invalid_rows:
                    raise DataError(
                        f"{source.name}, row {i}: field `{problem.field}`: {problem.detail} ({problem.reason}). "
                        "Fix the row, or pass --skip-invalid-rows to drop bad rows and count them."
                    ) from None
                skipped[problem.reason] += 1
                continue
            extra = passthrough_fields(raw)
            rows.append({"index": total - 1, "prompt": prompt, "response": response, "extra": extra})
    return rows, skipped, total, True


# Fields of an input row that are the texts scored, not passed through to the output line.
TEXT_FIELDS = ("prompt", "system", "instruction", "input", "history", "messages", "conversations", *RESPONSE_COLUMNS,
               *PAIR_COLUMNS)  # fmt: skip


def passthrough_fields(raw: Any) -> dict[str, Any]:
    """The scalar fields of an input row (`id`, `topic`, ...) that each of its output lines keeps, so that results
    can be joined back to the input."""
    if not isinstance(raw, dict):
        return {}
    return {k: v for k, v in raw.items() if isinstance(v, (int, float, str, bool)) and k not in TEXT_FIELDS}


def raw_rows_by_source(data_path: str, data_args: DataArguments) -> dict[str, list[Any]]:
    """The readable raw rows of each file `data_path` names (file, folder or registry entry), by file name: what
    a pairwise row's `source` and `source_row` point at."""
    out: dict[str, list[Any]] = {}
    for spec in split_specs(data_path):
        for source in read_dataset(spec, data_args, data_args.synthetic_seed):
            out[source.name] = [r for r in source.rows if not isinstance(r, UnreadableLine)]
    return out


def load_reward_model_for_scoring(model_dir: str, has_variance: bool):
    """(model, tokenizer): a reward model in eval mode, with its variance head and epistemic term when saved."""

    model, tokenizer = load_model_with_heads(
        ModelArguments(model_name_or_path=model_dir),
        FinetuningArguments(stage="rm"),
        heads=reward_heads(has_variance),
        is_trainable=False,
    )
    return model.eval(), tokenizer


def encode_prompt_response(tokenizer, prompt, response, cutoff_len: int) -> tuple[list[int], list[int]] | None:
    """(prompt ids, response ids) tokenised as reward-model training does; None when truncation empties it."""
    prompt_ids, response_ids, _ = truncate_pair(
        *tokenize_pair(tokenizer, {"prompt": prompt, "chosen": response, "rejected": response}), cutoff_len
    )
    return (prompt_ids, response_ids) if response_ids else None


def encode_rows(
    tokenizer, rows: list[dict[str, Any]], cutoff_len: int, skipped: Counter
) -> Iterator[tuple[dict[str, Any], tuple[list[int], list[int]]]]:
    """(row, (prompt ids, response ids)) of each prompt + response row; rows that truncation empties are counted in
    `skipped` and left out."""
    for row in rows:
        encoded = encode_prompt_response(tokenizer, row["prompt"], row["response"], cutoff_len)
        if encoded is None:
            skipped[TRUNCATED] += 1
        else:
            yield row, encoded


@torch.no_grad()
def score_token_pairs(
    model, items: list[tuple[list[int], list[int]]], pad_token_id: int, batch_size: int = 16
) -> list[dict[str, float]]:
    """Score (prompt ids, response ids) items; one dict per item: `mean` and, when the model has them,
    `aleatoric_variance`, `epistemic_variance`, `variance` (total) and `sigma`.

    Prompts are left-padded and responses right-padded, as in PPO (`score_responses_detailed`), so `score`,
    best-of-n and PPO compute the same numbers for the same tokens.
    """

    out: list[dict[str, float]] = []
    device = model.device
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        query_ids, query_mask = left_pad([p for p, _ in chunk], pad_token_id)
        width = max(len(r) for _, r in chunk)
        response_ids = torch.full((len(chunk), width), int(pad_token_id), dtype=torch.long)
        response_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, (_, ids) in enumerate(chunk):
            response_ids[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
            response_mask[row, : len(ids)] = 1
        scores = score_responses_detailed(
            model, query_ids.to(device), query_mask.to(device), response_ids.to(device), response_mask.to(device)
        )
        out += [scores.item(row) for row in range(len(chunk))]
    return out


def score_file(
    model_dir: str,
    data_path: str,
    out_path: str,
    cutoff_len: int = 1024,
    batch_size: int = 16,
    skip_invalid_rows: bool = False,
) -> ScoreSummary:
    """Write one JSON line per response and return a `ScoreSummary`.

    Prompt + response rows give `index` (row), `prompt`, `text`, the scores and the row's other scalar fields;
    pairwise rows give `index`, `response` (chosen / rejected), `prompt` (the last user turn), `text`, the scores and
    the row's other scalar fields (`id`, ...).
    """
    has_variance = check_reward_model_dir(model_dir)
    rows, skipped, total, prompt_response = read_prompt_response_rows(data_path, skip_invalid_rows)
    model, tokenizer = load_reward_model_for_scoring(model_dir, has_variance)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    lines: list[dict[str, Any]] = []
    items: list[tuple[list[int], list[int]]] = []
    if prompt_response:
        for row, encoded in encode_rows(tokenizer, rows, cutoff_len, skipped):
            items.append(encoded)
            lines.append({"index": row["index"], "prompt": row["prompt"][-1]["content"],
                          "text": row["response"][0]["content"], **row["extra"]})  # fmt: skip
    else:
        data_args = DataArguments(dataset=data_path, cutoff_len=cutoff_len, skip_invalid_rows=skip_invalid_rows)
        bundle = get_dataset(data_args, tokenizer, stage="rm", seed=0, purpose=SCORING)
        skipped.update(bundle.stats)
        total = len(bundle.train) + sum(bundle.stats.values())
        raw = raw_rows_by_source(data_path, data_args)
        for i, row in enumerate(bundle.train):
            extra = passthrough_fields(raw[row["source"]][row["source_row"]])
            for which in PAIR_COLUMNS:
                items.append((row["prompt_input_ids"], row[f"{which}_input_ids"]))
                # The row's own texts (the tokens also hold the template's turn end, e.g. ChatML's "<|im_end|>\n").
                lines.append({"index": i, "response": which, "prompt": row["prompt"][-1]["content"],
                              "text": row[which][-1]["content"], **extra})  # fmt: skip
    if not items:
        raise DataError(f"No row of {data_path!r} is left to score ({dict(skipped) or 'none skipped'}).")
    if skipped:
        logger.warning("Skipped %d of %d rows of %s: %s.", sum(skipped.values()), total, data_path,
                       ", ".join(f"{n} {reason}" for reason, n in skipped.items()))  # fmt: skip
    scores = score_token_pairs(model, items, pad, batch_size)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w", encoding="utf-8") as f:
        for line, score in zip(lines, scores):
            f.write(json.dumps({**line, **score}, ensure_ascii=False) + "\n")
    return ScoreSummary(len(lines), total, dict(skipped), "prompt + response" if prompt_response else "pairwise")
