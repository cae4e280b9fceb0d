"""Dataset formats: detection from the columns, and conversion of one raw row to a canonical row.

Canonical pairwise row (what every format becomes)::

    {"prompt": [{"role": "system"|"user"|"assistant", "content": str}, ...],   # context, system first
     "chosen": [{"role": "assistant", "content": str}],
     "rejected": [{"role": "assistant", "content": str}],
     "margin": float,                                                         # 0.0 when absent
     ...passthrough: true_reward_chosen, true_reward_rejected, noise, topic (when present)}

Canonical prompt-only row (stage ppo): `{"prompt": [messages...]}` plus passthrough `topic`, `noise`.

Converters raise `checks.RowProblem` for a bad row; the pipeline decides whether to stop or skip.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from ..errors import DataError
from .checks import (
    IDENTICAL,
    MALFORMED,
    WRONG_TYPE,
    RowProblem,
    as_float,
    as_margin,
    as_message,
    as_messages,
    check_pair,
    check_prompt,
    optional_str,
    require,
    require_str,
    with_system,
)

PAIRWISE_FORMATS = ("pairwise", "implicit", "hh_rlhf", "sharegpt")
FORMAT_COLUMNS = {
    "pairwise": "`prompt`, `chosen`, `rejected` (strings or message lists; optional `system`, `margin`)",
    "implicit": "`chosen`, `rejected` (message lists sharing their first turns)",
    "hh_rlhf": "`chosen`, `rejected` (transcripts with `\\n\\nHuman:` / `\\n\\nAssistant:` turns)",
    "sharegpt": "`conversations` [{from, value}], `chosen` {from, value}, `rejected` {from, value} (optional `system`)",
    "prompt": "`prompt`, or `instruction` (+ `input`), or `messages` / `conversations`",
}
# Ground truth of `builtin:synthetic` rows, carried from the data to eval (label arrays of the rm / dpo trainers).
GROUND_TRUTH_COLUMNS = ("true_reward_chosen", "true_reward_rejected", "noise")
PASSTHROUGH_FLOATS = GROUND_TRUTH_COLUMNS
PASSTHROUGH_COLUMNS = PASSTHROUGH_FLOATS + ("topic",)
PROMPT_PASSTHROUGH = ("noise", "topic")
HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def _formats_expected() -> str:
    return "; ".join(f"{name}: {cols}" for name, cols in FORMAT_COLUMNS.items())


def _first_value(rows: list[dict[str, Any]], column: str) -> Any:
    """The first non-null value of a column, to tell string transcripts from message lists."""
    for row in rows:
        if isinstance(row, dict) and row.get(column) is not None:
            return row[column]
    return None


def detect_format(columns: list[str], rows: list[dict[str, Any]], source: str) -> str:
    """Name the format of a dataset from its columns (and, for `chosen`/`rejected` alone, their first value)."""
    cols = set(columns)
    if {"chosen", "rejected"} <= cols:
        if "conversations" in cols:
            return "sharegpt"
        if "prompt" in cols:
            return "pairwise"
        first = _first_value(rows, "chosen")
        if isinstance(first, list):
            return "implicit"
        if isinstance(first, str) and "Human:" in first and "Assistant:" in first:
            return "hh_rlhf"
    elif not cols & {"chosen", "rejected"} and cols & {"prompt", "instruction", "messages", "conversations"}:
        return "prompt"  # (with only one of chosen/rejected the pair is incomplete: reported below)
    raise DataError(
        f"Cannot tell the format of {source}: its columns are {', '.join(f'`{c}`' for c in columns) or '(none)'}. "
        f"Expected one of these column sets: {_formats_expected()}. Rename the columns, or set `dataset_format` "
        "if the columns are right but detection fails."
    )


def row_format(row: Any) -> str | None:
    """The format one row's own columns fit, or None when they fit none (a bad row, reported by its converter)."""
    if not isinstance(row, dict):
        return None
    try:
        return detect_format(list(row), [row], "a row")
    except DataError:
        return None


def detect_rows_format(columns: list[str], rows: list[Any], source: str) -> tuple[str, list[str | None]]:
    """The format of most rows (ties: the earliest), and each row's own format.

    Detecting from the union of all columns would call a file that mixes formats by a format no row has, and
    then blame row 0; with the majority, the rows of the other format are the ones named.
    """
    per_row = [row_format(row) for row in rows]
    counts: dict[str, int] = {}
    for fmt in per_row:
        if fmt is not None:
            counts[fmt] = counts.get(fmt, 0) + 1
    if not counts:
        return detect_format(columns, rows, source), per_row
    return max(counts, key=counts.__getitem__), per_row


def check_columns(fmt: str, columns: list[str], source: str) -> None:
    """A format named with `dataset_format` must find its columns in the file."""
    cols = set(columns)
    needed = {
        "pairwise": [{"prompt", "chosen", "rejected"}],
        "implicit": [{"chosen", "rejected"}],
        "hh_rlhf": [{"chosen", "rejected"}],
        "sharegpt": [{"conversations", "chosen", "rejected"}],
        "prompt": [{"prompt"}, {"instruction"}, {"messages"}, {"conversations"}],
    }[fmt]
    if not any(n <= cols for n in needed):
        raise DataError(
            f"`dataset_format: {fmt}` needs the columns {FORMAT_COLUMNS[fmt]}, but {source} has "
            f"{', '.join(f'`{c}`' for c in columns) or 'no columns'}. Fix the columns or set `dataset_format: auto`."
        )


def _passthrough(row: dict[str, Any], columns: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for col in columns:
        value = row.get(col)
        if value is None:
            continue
        if col in PASSTHROUGH_FLOATS:
            out[col] = as_float(value, col)
        elif not isinstance(value, str):
            raise RowProblem(WRONG_TYPE, col, f"expected a string, got {type(value).__name__}")
        else:
            out[col] = value
    return out


def _is_message_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict)


def _pairwise(row: dict[str, Any]) -> dict[str, Any]:
    """Explicit prompt (TRL standard and conversational)."""
    prompt, chosen, rejected = require(row, "prompt"), require(row, "chosen"), require(row, "rejected")
    # TRL tolerates a redundant string `prompt` next to full conversations in chosen/rejected
    # (see trl.data_utils.maybe_extract_prompt): the real prompt is then the shared prefix.
    if (
        isinstance(prompt, str)
        and _is_message_list(chosen)
        and _is_message_list(rejected)
        and as_message(chosen[0], "chosen[0]")["role"] != "assistant"
    ):
        return _implicit(row)
    prompt_msgs = with_system(as_messages(prompt, "prompt", default_role="user"), optional_str(row, "system"))
    return {
        "prompt": prompt_msgs,
        "chosen": as_messages(chosen, "chosen", default_role="assistant"),
        "rejected": as_messages(rejected, "rejected", default_role="assistant"),
    }


def _implicit(row: dict[str, Any]) -> dict[str, Any]:
    """The prompt is the longest common prefix of the two conversations (trl.data_utils.extract_prompt)."""
    chosen = as_messages(require(row, "chosen"), "chosen")
    rejected = as_messages(require(row, "rejected"), "rejected")
    if chosen == rejected:
        raise RowProblem(IDENTICAL, "rejected", "the rejected conversation is identical to the chosen one")
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0 and chosen and rejected:
        raise RowProblem(MALFORMED, "chosen", "chosen and rejected share no first turn, so there is no prompt")
    return {
        "prompt": with_system(chosen[:shared], optional_str(row, "system")),
        "chosen": chosen[shared:],
        "rejected": rejected[shared:],
    }


def _hh_turns(text: str, field: str) -> list[dict[str, str]]:
    """`\\n\\nHuman: a\\n\\nAssistant: b` -> [user a, assistant b]."""
    text = "\n\n" + text.lstrip("\n")
    lead, *parts = HH_TURN.split(text)
    if lead.strip() or not parts:
        raise RowProblem(MALFORMED, field, "the transcript does not start with a `\\n\\nHuman:` turn")
    speakers, contents = parts[0::2], parts[1::2]
    return [
        {"role": "user" if who == "Human" else "assistant", "content": content.strip()}
        for who, content in zip(speakers, contents)
    ]


def _hh_rlhf(row: dict[str, Any]) -> dict[str, Any]:
    """Anthropic hh-rlhf: the prompt is every turn before the last Assistant turn."""
    chosen = _hh_turns(require_str(row, "chosen"), "chosen")
    rejected = _hh_turns(require_str(row, "rejected"), "rejected")
    for field, turns in (("chosen", chosen), ("rejected", rejected)):
        if turns[-1]["role"] != "assistant":
            raise RowProblem(MALFORMED, field, "the transcript does not end with an `\\n\\nAssistant:` turn")
    if chosen[:-1] != rejected[:-1]:
        raise RowProblem(
            MALFORMED, "rejected", "the turns before the last Assistant turn differ between chosen and rejected"
        )
    return {"prompt": chosen[:-1], "chosen": chosen[-1:], "rejected": rejected[-1:]}


def _sharegpt(row: dict[str, Any]) -> dict[str, Any]:
    """LlamaFactory sharegpt ranking data."""
    prompt = with_system(as_messages(require(row, "conversations"), "conversations"), optional_str(row, "system"))
    out = {"prompt": prompt}
    for field in ("chosen", "rejected"):
        message = as_message(require(row, field), field)
        if message["role"] != "assistant":
            raise RowProblem(MALFORMED, field, f"the response comes from {message['role']!r}, not from gpt/assistant")
        out[field] = [message]
    return out


PAIRWISE_CONVERTERS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "pairwise": _pairwise,
    "implicit": _implicit,
    "hh_rlhf": _hh_rlhf,
    "sharegpt": _sharegpt,
}


def to_pairwise_row(row: Any, fmt: str) -> dict[str, Any]:
    """Convert and check one raw row of a pairwise format. Raises RowProblem."""
    if not isinstance(row, dict):
        raise RowProblem(WRONG_TYPE, "(row)", f"expected an object with named fields, got {type(row).__name__}")
    pair = PAIRWISE_CONVERTERS[fmt](row)
    check_prompt(pair["prompt"])
    check_pair(pair["chosen"], pair["rejected"])
    pair["margin"] = as_margin(row.get("margin"))
    pair.update(_passthrough(row, PASSTHROUGH_COLUMNS))
    return pair


def _prompt_messages(row: dict[str, Any]) -> list[dict[str, str]]:
    if "prompt" in row:
        return as_messages(require(row, "prompt"), "prompt", default_role="user")
    if "instruction" in row:
        # LlamaFactory's alpaca layout: the optional `input` follows the instruction.
        instruction, extra = require_str(row, "instruction"), optional_str(row, "input")
        return [{"role": "user", "content": f"{instruction}\n\n{extra}" if extra else instruction}]
    field = "messages" if "messages" in row else "conversations"
    messages = as_messages(require(row, field), field)
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]  # the reference answer is not part of the prompt
    return messages


def to_prompt_row(row: Any, fmt: str) -> dict[str, Any]:
    """Convert and check one raw row to a prompt-only row (stage ppo); pairwise formats keep their prompt."""
    if not isinstance(row, dict):
        raise RowProblem(WRONG_TYPE, "(row)", f"expected an object with named fields, got {type(row).__name__}")
    if fmt == "prompt":
        prompt = with_system(_prompt_messages(row), optional_str(row, "system"))
    else:
        prompt = PAIRWISE_CONVERTERS[fmt](row)["prompt"]
    check_prompt(prompt)
    return {"prompt": prompt, **_passthrough(row, PROMPT_PASSTHROUGH)}
