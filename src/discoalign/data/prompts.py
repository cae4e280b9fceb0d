"""Prompt batches for rollouts: left padding, and a seeded order that a resumed run can replay.

Prompts are padded on the LEFT so that every prompt ends at the same position `P - 1` and generation continues
all rows from there. The order of prompts is a fixed permutation per epoch (`seed + epoch`), so PPO step k
always sees the same prompts, whatever happened before; each process of a distributed run takes its own
slice of the step's global batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def left_pad(sequences: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists into (input_ids (B, P) long, attention_mask (B, P) long)."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), int(pad_token_id), dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, ids in enumerate(sequences):
        if len(ids):
            input_ids[i, width - len(ids) :] = torch.as_tensor(list(ids), dtype=torch.long)
            attention_mask[i, width - len(ids) :] = 1
    return input_ids, attention_mask


class PromptSchedule:
    """Which dataset rows each PPO step rolls out.

    Args:
        num_rows: size of the prompt dataset.
        batch_size: prompts per process per step.
        num_processes, process_index: this process's place in a distributed run.
        seed: the order of epoch e is `randperm(num_rows)` drawn from a generator seeded with `seed + e`.
    """

    def __init__(self, num_rows: int, batch_size: int, seed: int, num_processes: int = 1, process_index: int = 0):
        self.num_rows = num_rows
        self.batch_size = batch_size
        self.seed = seed
        self.num_processes = num_processes
        self.process_index = process_index
        # Incomplete global batches at the end of an epoch are dropped (every step has the same size).
        self.steps_per_epoch = num_rows // (batch_size * num_processes)

    def _order(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.num_rows, generator=generator)

    def indices(self, step: int) -> list[int]:
        """Row indices this process rolls out at PPO step `step` (0-based)."""
        if self.steps_per_epoch == 0:
            raise ValueError("the dataset is smaller than one rollout batch")
        epoch, position = divmod(step, self.steps_per_epoch)
        global_size = self.batch_size * self.num_processes
        start = position * global_size + self.process_index * self.batch_size
        return self._order(epoch)[start : start + self.batch_size].tolist()


def prompt_rows(dataset, indices: list[int]) -> list[dict[str, Any]]:
    """The rows of a `datasets.Dataset` at `indices`, as dicts (prompt_input_ids, prompt, topic, ...)."""
    return [dataset[i] for i in indices]
