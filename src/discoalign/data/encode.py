"""Templating, tokenisation and truncation of canonical rows.

With a chat template (the tokenizer's `chat_template`), ids are computed exactly as TRL 1.16's
`DPOTrainer._prepare_dataset` computes them for conversational data:

* `prompt_ids`    = template(prompt, add_generation_prompt=True)
* `full_ids`      = template(prompt + response)
* the response starts where `prompt_ids` and the two `full_ids` first differ (usually right after the
  prompt; some templates render the generation prompt differently), so the response ids are the tokens
  the template adds for the response, including what it puts after the turn (ChatML: `<|im_end|>\\n`).

Without a chat template a plain fallback template is used (and tokenised with the tokenizer's own special
tokens, like TRL's standard-text path)::

    System: {system}\\n\\nUser: {user}\\n\\nAssistant: {assistant}\\n\\nUser: {user}\\n\\nAssistant:

and a response is rendered as `" " + content`.

EOS is appended to a response whose tokens hold no EOS (with ChatML the template's `<|im_end|>` is the EOS,
so nothing is added, as in TRL).

Truncation to `cutoff_len` (prompt + the longer response): the prompt is cut from the LEFT first (keeping
at least one token), then both responses from the RIGHT. A row whose response would be left empty is
dropped by the caller and counted as `checks.TRUNCATED`.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

FALLBACK_ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}


def render_fallback(messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """The fallback template: `Role: content` turns joined by blank lines, then `Assistant:` if asked."""
    turns = [f"{FALLBACK_ROLE_NAMES[m['role']]}: {m['content']}" for m in messages]
    if add_generation_prompt:
        turns.append("Assistant:")
    return "\n\n".join(turns)


def has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    """True when the tokenizer carries a chat template (else the fallback template is used)."""
    return bool(getattr(tokenizer, "chat_template", None))


def template_ids(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], add_generation_prompt: bool = False
) -> list[int]:
    """Token ids of a conversation rendered with the chat template, or with the fallback template."""
    if has_chat_template(tokenizer):
        out = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, add_generation_prompt=add_generation_prompt
        )
        return list(out["input_ids"])
    # The fallback renders prompt+response as prompt text + " " + content, so that the prompt text is a
    # prefix of prompt+response text (the generation prompt ends with "Assistant:").
    return list(tokenizer(render_fallback(messages, add_generation_prompt))["input_ids"])


def _common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _with_eos(ids: list[int], eos_id: int | None) -> list[int]:
    if eos_id is None or eos_id in ids:
        return ids
    return ids + [eos_id]


def tokenize_pair(tokenizer: PreTrainedTokenizerBase, row: dict[str, Any]) -> tuple[list[int], list[int], list[int]]:
    """Untruncated `(prompt_ids, chosen_ids, rejected_ids)` of a canonical pairwise row."""
    prompt_ids = template_ids(tokenizer, row["prompt"], add_generation_prompt=True)
    chosen_full = template_ids(tokenizer, row["prompt"] + row["chosen"])
    rejected_full = template_ids(tokenizer, row["prompt"] + row["rejected"])
    prompt_len = min(_common_prefix_length(prompt_ids, chosen_full), _common_prefix_length(prompt_ids, rejected_full))
    eos_id = tokenizer.eos_token_id
    return (
        prompt_ids[:prompt_len],
        _with_eos(chosen_full[prompt_len:], eos_id),
        _with_eos(rejected_full[prompt_len:], eos_id),
    )


def truncate_pair(
    prompt_ids: list[int], chosen_ids: list[int], rejected_ids: list[int], cutoff_len: int
) -> tuple[list[int], list[int], list[int]]:
    """Fit prompt + the longer response into `cutoff_len`: prompt cut from the left, then responses from the right.

    The prompt keeps at least one token (the beta head reads the last prompt token). A returned response may be
    empty only when `cutoff_len` leaves no room at all; the caller drops such a row.
    """
    longest = max(len(chosen_ids), len(rejected_ids))
    if len(prompt_ids) + longest <= cutoff_len:
        return prompt_ids, chosen_ids, rejected_ids
    keep_prompt = min(len(prompt_ids), max(1, cutoff_len - longest))
    prompt_ids = prompt_ids[len(prompt_ids) - keep_prompt :]
    room = max(0, cutoff_len - keep_prompt)
    return prompt_ids, chosen_ids[:room], rejected_ids[:room]


def encode_pair(
    tokenizer: PreTrainedTokenizerBase, row: dict[str, Any], cutoff_len: int, cut: Counter | None = None
) -> dict[str, Any] | None:
    """A tokenised pairwise row (`prompt_input_ids`, `chosen_input_ids`, `rejected_input_ids` + the row's
    other fields), or None when truncation would leave a response empty.

    `cut`, when given, counts the rows whose "prompt" and whose "response" (either one) truncation shortened."""
    full = tokenize_pair(tokenizer, row)
    prompt_ids, chosen_ids, rejected_ids = truncate_pair(*full, cutoff_len)
    if cut is not None:
        cut["prompt"] += len(prompt_ids) < len(full[0])
        cut["response"] += len(chosen_ids) < len(full[1]) or len(rejected_ids) < len(full[2])
    if not chosen_ids or not rejected_ids:
        return None
    return {
        **row,
        "prompt_input_ids": prompt_ids,
        "chosen_input_ids": chosen_ids,
        "rejected_input_ids": rejected_ids,
    }


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase, row: dict[str, Any], cutoff_len: int, cut: Counter | None = None
) -> dict[str, Any]:
    """A tokenised prompt-only row: `prompt_input_ids` (with the generation prompt), cut from the left to
    `cutoff_len - 1` tokens so that at least one generated token fits (counted in `cut["prompt"]`)."""
    prompt_ids = template_ids(tokenizer, row["prompt"], add_generation_prompt=True)
    keep = max(1, cutoff_len - 1)
    if cut is not None:
        cut["prompt"] += len(prompt_ids) > keep
    return {**row, "prompt_input_ids": prompt_ids[-keep:]}
