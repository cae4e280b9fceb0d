"""Helpers every preference trainer shares: deterministic forwards and the frozen reference of full fine-tuning."""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

from .distributed import zero_stage


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


class ReferenceForward:
    """The reference side of a trainer with a reference model (DPO, KTO): which module is the reference and how its
    forward runs without autograd. A mixin for `DiscoTrainer` subclasses; `init_reference_forward` after
    `Trainer.__init__`."""

    def init_reference_forward(self, ft) -> None:
        # inference_mode skips autograd's version counters and views bookkeeping entirely; no_grad is the fallback.
        self.reference_grad_off = torch.inference_mode if ft.reference_inference_mode else torch.no_grad
        if zero_stage(self.args) == 3:
            # ZeRO-3 gathers weights into new tensors as layers run: made under inference_mode they would be
            # inference tensors, which a later training forward (the shared LoRA layers) cannot save for backward.
            self.reference_grad_off = torch.no_grad
        self.is_lora = ft.finetuning_type == "lora"
        self.logps_chunk_size = ft.logps_chunk_size
        self.reference_forward_calls = 0

    def _policy(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)

    def reference_module(self) -> tuple[nn.Module, contextlib.AbstractContextManager]:
        """(module, context) to run the reference forward in: the frozen `ref_model`, or the policy with its LoRA
        adapters disabled. Full fine-tuning without `ref_model` only lands here while precomputing reference
        log-probs, before the first optimizer step, when the policy still equals the reference."""
        self.reference_forward_calls += 1
        if self.ref_model is not None:
            return self.accelerator.unwrap_model(self.ref_model), contextlib.nullcontext()
        policy = self._policy()
        return policy, policy.disable_adapter()
