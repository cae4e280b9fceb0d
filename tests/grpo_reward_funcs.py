"""Reward functions for tests/test_grpo_*.py, named in configs as `grpo_reward_funcs:<name>` (TRL's signature)."""

from __future__ import annotations

CALLS: list[dict] = []


def length_reward(prompts, completions, **kwargs):
    """Characters of the completion / 10; records what it was called with."""
    CALLS.append({"prompts": prompts, "completions": completions, **kwargs})
    return [len(c[0]["content"]) / 10.0 for c in completions]


def topic_reward(prompts, completions, topic, **kwargs):
    """1 for completions to `science` prompts, else 0 (reads a dataset column)."""
    return [1.0 if t == "science" else 0.0 for t in topic]


NOT_A_FUNCTION = 3
