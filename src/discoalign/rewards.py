"""Rule-based reward functions for `stage: grpo` (`reward_funcs: [discoalign.rewards:<name>]`), with TRL's
signature: `f(prompts, completions, **columns) -> list[float]`, completions in TRL's conversational layout
(`[{"role": "assistant", "content": text}]`) or plain strings.

They reward *format*, not quality, and are meant to sit next to a reward model (docs/grpo.md).
"""

from __future__ import annotations

from typing import Any


def _text(completion: Any) -> str:
    return completion[-1]["content"] if isinstance(completion, list) else str(completion)


def word_count_in_range(completions: list[Any], low: int = 4, high: int = 6, **kwargs: Any) -> list[float]:
    """1.0 for a completion of `low`..`high` words (builtin:synthetic's responses have 4-6 adjectives), else
    `-|distance to the range| / high`: a format rule that keeps responses short without saying which words are good."""
    out = []
    for completion in completions:
        n = len(_text(completion).split())
        out.append(1.0 if low <= n <= high else -min(abs(n - low), abs(n - high)) / high)
    return out


def short_answer(completions: list[Any], **kwargs: Any) -> list[float]:
    """`word_count_in_range` with 8..30 words: the rule of the real-model GRPO run (docs/grpo.md). SmolLM2-135M-Instruct
    tends to answer at length, so a concise-answer rule is one its samples can visibly move toward in a few steps, and
    whose optimisation can be checked directly (the lengths), unlike a learned reward."""
    return word_count_in_range(completions, low=8, high=30)
