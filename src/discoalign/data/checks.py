"""Bad-row detection: the reasons a row can be rejected and the small checks that raise them.

A check raises `RowProblem(reason, field, detail)`; the pipeline turns it into a `DataError` naming the file
and row, or, with `skip_invalid_rows: true`, drops the row and counts it under `reason`.
"""

from __future__ import annotations

import math
from typing import Any

# The reasons, as counted in `DatasetBundle.stats` and the log.
MISSING = "missing or null field"
WRONG_TYPE = "wrong type"
EMPTY_PROMPT = "empty prompt"
EMPTY_RESPONSE = "empty response"
IDENTICAL = "chosen identical to rejected"
BAD_MARGIN = "non-numeric margin"
MALFORMED = "malformed conversation"
TRUNCATED = "response empty after truncation"
UNREADABLE = "unreadable line (not JSON or not UTF-8)"
OTHER_FORMAT = "row of another format"
NOT_ASSISTANT = "response not from the assistant"
BAD_TEXT = "invalid text"

# sharegpt (LlamaFactory) speaker names -> our roles.
ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class RowProblem(Exception):
    """One row cannot be used: `reason` is one of the constants above, `field` the column (or path inside it)."""

    def __init__(self, reason: str, field: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.field = field
        self.detail = detail


def check_text(row: dict[str, Any]) -> None:
    """Every string of the row must be valid Unicode: JSON's `\\ud800` escapes decode to lone surrogates, which
    the tokenizer and Arrow cannot encode."""
    import json

    for key, value in row.items():
        try:
            json.dumps(value, ensure_ascii=False, default=str).encode("utf-8")
        except UnicodeEncodeError as e:
            raise RowProblem(
                BAD_TEXT, str(key), f"the text holds a lone UTF-16 surrogate ({e.object[e.start]!r}), which is not "
                "valid Unicode; fix the escape sequence in the file",
            ) from None  # fmt: skip


def require(row: dict[str, Any], field: str) -> Any:
    """The value of `field`, or RowProblem(MISSING) when the key is absent or null."""
    value = row.get(field)
    if value is None:
        raise RowProblem(MISSING, field, "the value is null" if field in row else "the row has no such field")
    return value


def require_str(row: dict[str, Any], field: str) -> str:
    """A string field that must be present."""
    value = require(row, field)
    if not isinstance(value, str):
        raise RowProblem(WRONG_TYPE, field, f"expected a string, got {type(value).__name__}")
    return value


def optional_str(row: dict[str, Any], field: str) -> str:
    """A string field that may be absent or null (read as "")."""
    value = row.get(field)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RowProblem(WRONG_TYPE, field, f"expected a string, got {type(value).__name__}")
    return value


def as_message(value: Any, field: str) -> dict[str, str]:
    """One message as `{"role", "content"}`, from `{role, content}` or sharegpt `{from, value}`."""
    if not isinstance(value, dict):
        raise RowProblem(WRONG_TYPE, field, f"expected a message object, got {type(value).__name__}")
    role_key, content_key = ("from", "value") if "from" in value or "value" in value else ("role", "content")
    role = value.get(role_key)
    content = value.get(content_key)
    if role is None:
        raise RowProblem(MISSING, f"{field}.{role_key}", "the message has no role")
    if content is None:
        raise RowProblem(MISSING, f"{field}.{content_key}", "the message has no content")
    if isinstance(content, list):
        content = content_parts_text(content, f"{field}.{content_key}")
    if not isinstance(role, str):
        raise RowProblem(WRONG_TYPE, f"{field}.{role_key}", f"expected a string role, got {type(role).__name__}")
    if not isinstance(content, str):
        raise RowProblem(WRONG_TYPE, f"{field}.{content_key}", f"expected string content, got {type(content).__name__}")
    canonical_role = ROLE_ALIASES.get(role.lower())
    if canonical_role is None:
        raise RowProblem(
            MALFORMED, f"{field}.{role_key}", f"unknown role {role!r}; expected one of {', '.join(ROLE_ALIASES)}"
        )
    return {"role": canonical_role, "content": content}


# Typed content parts (TRL / OpenAI vision-language messages) -> the markers LlamaFactory writes in the text.
PART_MARKERS = {
    "image": "<image>",
    "image_url": "<image>",
    "audio": "<audio>",
    "input_audio": "<audio>",
    "video": "<video>",
}


def content_parts_text(parts: list[Any], field: str) -> str:
    """`[{"type": "image"}, {"type": "text", "text": "What is it?"}]` -> `"<image>What is it?"`.

    The media themselves come from the row's `images` / `audios` columns; a part only marks where they go.
    """
    pieces = []
    for i, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            pieces.append(part["text"])
        elif kind in PART_MARKERS:
            pieces.append(PART_MARKERS[kind])
        else:
            raise RowProblem(
                WRONG_TYPE, f"{field}[{i}]",
                "expected a content part {\"type\": \"text\", \"text\": ...} or {\"type\": \"image\" | \"audio\"}",
            )  # fmt: skip
    return "".join(pieces)


def as_messages(value: Any, field: str, default_role: str | None = None) -> list[dict[str, str]]:
    """A message list from a list of message objects, or from a plain string when `default_role` is given."""
    if isinstance(value, str) and default_role is not None:
        return [{"role": default_role, "content": value}]
    if not isinstance(value, list):
        expected = "a string or a list of messages" if default_role else "a list of messages"
        raise RowProblem(WRONG_TYPE, field, f"expected {expected}, got {type(value).__name__}")
    return [as_message(m, f"{field}[{i}]") for i, m in enumerate(value)]


def with_system(prompt: list[dict[str, str]], system: str) -> list[dict[str, str]]:
    """Prepend a system message unless `system` is empty or the prompt already starts with one."""
    if not system or (prompt and prompt[0]["role"] == "system"):
        return prompt
    return [{"role": "system", "content": system}] + prompt


def as_margin(value: Any) -> float:
    """The `margin` field as a finite float; absent or null is 0.0. Numeric strings (CSV) are accepted."""
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise RowProblem(BAD_MARGIN, "margin", f"expected a number, got {type(value).__name__} {value!r}")
    try:
        margin = float(value)
    except ValueError:
        raise RowProblem(BAD_MARGIN, "margin", f"expected a number, got {value!r}") from None
    if not math.isfinite(margin):
        raise RowProblem(BAD_MARGIN, "margin", f"expected a finite number, got {value!r}")
    return margin


def as_float(value: Any, field: str) -> float:
    """A numeric passthrough column (true rewards, noise) as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RowProblem(WRONG_TYPE, field, f"expected a number, got {type(value).__name__}")
    return float(value)


def check_prompt(prompt: list[dict[str, str]], field: str = "prompt") -> None:
    """A prompt must hold a non-empty user turn and end with it (the response answers that turn)."""
    if not prompt or all(not m["content"].strip() for m in prompt):
        raise RowProblem(EMPTY_PROMPT, field, "the prompt is empty")
    if prompt[-1]["role"] != "user":
        raise RowProblem(
            MALFORMED, field, f"the prompt must end with a user turn, but its last turn is {prompt[-1]['role']!r}"
        )


def check_pair(chosen: list[dict[str, str]], rejected: list[dict[str, str]]) -> None:
    """Both responses non-empty, written by the assistant only, and different from each other."""
    for field, response in (("chosen", chosen), ("rejected", rejected)):
        if not response or all(not m["content"].strip() for m in response):
            raise RowProblem(EMPTY_RESPONSE, field, "the response is empty")
        for i, message in enumerate(response):
            # A user (or system) turn inside a response would put its role header into the tokens being scored.
            if message["role"] != "assistant":
                raise RowProblem(
                    NOT_ASSISTANT, f"{field}[{i}].role",
                    f"a response holds only assistant messages, but this one is from {message['role']!r}; put "
                    "earlier turns in the prompt",
                )  # fmt: skip
    if chosen == rejected:
        raise RowProblem(IDENTICAL, "rejected", "the rejected response is identical to the chosen one")
