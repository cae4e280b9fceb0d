"""GRPO's sequence reward: the reward model's score and/or Python reward functions, weighted and summed.

A reward function has TRL's signature: `f(prompts, completions, completion_ids, trainer_state, **columns)` ->
one float (or None: no reward) per completion. The rows here are conversational, as TRL passes them for
conversational datasets: `prompts[i]` is the prompt's message list, `completions[i]` is
`[{"role": "assistant", "content": text}]`; `columns` are the prompt row's other columns (builtin:synthetic:
`topic`, `noise`), one value per completion.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

SKIPPED_COLUMNS = ("prompt", "prompt_input_ids", "completion", "completion_ids")


def func_name(func: Callable) -> str:
    return getattr(func, "__name__", type(func).__name__)


def call_reward_funcs(
    funcs: list[Callable],
    rows: list[dict[str, Any]],
    completions: list[str],
    completion_ids: list[list[int]],
    trainer_state: Any = None,
) -> torch.Tensor:
    """(B, len(funcs)) fp32 rewards, NaN where a function returned None. ValueError naming a function that
    returns the wrong number of rewards."""
    prompts = [row["prompt"] for row in rows]
    messages = [[{"role": "assistant", "content": text}] for text in completions]
    keys = [k for k in rows[0] if k not in SKIPPED_COLUMNS] if rows else []
    columns = {key: [row.get(key) for row in rows] for key in keys}
    out = torch.zeros(len(rows), len(funcs))
    for j, func in enumerate(funcs):
        values = func(
            prompts=prompts, completions=messages, completion_ids=completion_ids, trainer_state=trainer_state, **columns
        )
        values = list(values)
        if len(values) != len(rows):
            raise ValueError(
                f"The reward function `{func_name(func)}` returned {len(values)} rewards for {len(rows)} completions; "
                "it must return one per completion."
            )
        out[:, j] = torch.tensor([float("nan") if v is None else float(v) for v in values])
    return out


def combine_rewards(per_source: torch.Tensor, weights: torch.Tensor, num_generations: int) -> torch.Tensor:
    """Weighted sum over sources (B, K) -> (B,), NaN-aware like TRL's `nansum`; a completion with no reward at all
    gets its group's mean (so its advantage is 0)."""
    total = (per_source * weights.unsqueeze(0)).nansum(dim=1)
    missing = torch.isnan(per_source).all(dim=1)
    if missing.any():
        grouped = torch.where(missing, torch.nan, total).view(-1, num_generations)
        fill = torch.nan_to_num(grouped.nanmean(dim=1, keepdim=True), nan=0.0).expand_as(grouped).reshape(-1)
        total = torch.where(missing, fill, total)
    return total
