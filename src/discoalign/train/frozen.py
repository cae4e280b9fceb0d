"""Helpers every preference trainer shares: deterministic forwards and the frozen reference of full fine-tuning."""

from __future__ import annotations

import copy

from torch import nn


def disable_dropout(module: nn.Module) -> None:
    """p = 0 in every `nn.Dropout` of `module`, as TRL's DPO and PPO do: policy and reference forwards are then
    deterministic, and PPO's ratio pi / pi_old is exactly 1 before the first update."""
    for m in module.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0


def frozen_copy(module: nn.Module) -> nn.Module:
    """A frozen deep copy of `module` in eval mode: the reference of full fine-tuning."""
    ref = copy.deepcopy(module)
    ref.requires_grad_(False)
    return ref.eval()
