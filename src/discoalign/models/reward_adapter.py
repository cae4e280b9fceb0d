"""A LoRA reward model kept as a second named adapter on the LoRA policy's own base (TRL's reward-adapter design).

One base serves the whole PPO loop: the policy is the base with its adapter (`default`), the reference is the base
with adapters disabled, and the reward model is the base with the reward adapter (`reward`) active, read by its
own value (and variance) head. Scoring switches the active adapter under no_grad and restores everything the
switch touches (active adapter, requires_grad of every adapter weight, train/eval mode of every module).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..config.heads import HEAD_NAMES
from ..errors import CheckpointError, ConfigError
from .checkpoint import load_heads
from .heads import build_heads, reward_heads
from .model_with_heads import HeadsOutput, ModelWithHeads, RewardScoring, last_token_hidden

REWARD_ADAPTER_NAME = "reward"


def same_base(a: str | None, b: str | None) -> bool:
    """True when two base-model names denote the same model (builtin and hub names as written; paths resolved)."""
    if not a or not b:
        return False
    if os.path.isdir(os.path.expanduser(a)) and os.path.isdir(os.path.expanduser(b)):
        return os.path.realpath(os.path.expanduser(a)) == os.path.realpath(os.path.expanduser(b))
    return a == b


class SharedBaseRewardModel(RewardScoring, nn.Module):
    """The reward adapter (+ its heads) on the policy's base; scores like a separately loaded reward model.

    Only the heads are submodules: the policy (and so the shared base) stays owned by the trainer, outside this
    module's parameters, state dict and `.to()`.
    """

    def __init__(
        self,
        policy: ModelWithHeads,
        heads: dict[str, nn.Module],
        adapter_name: str = REWARD_ADAPTER_NAME,
        heads_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self._policy = (policy,)  # a tuple, so nn.Module does not register the policy as a submodule
        for name in HEAD_NAMES:  # every registered head is an attribute, None when absent (as on ModelWithHeads)
            setattr(self, name, heads.get(name))
        self.adapter_name = adapter_name
        self.heads_config = dict(heads_config or {})
        self.epistemic: Any = None  # set by `load_heads` when the reward adapter's checkpoint has one

    @property
    def policy(self) -> ModelWithHeads:
        return self._policy[0]

    @property
    def config(self):
        return self.policy.config

    @property
    def device(self) -> torch.device:
        return self.value_head.summary.weight.device

    @contextlib.contextmanager
    def reward_adapter_active(self) -> Iterator[None]:
        """Within: the shared base runs the reward adapter, in eval mode; afterwards everything is as before."""
        peft_model = self.policy.backbone
        previous = peft_model.active_adapter
        adapter_grads = [(p, p.requires_grad) for n, p in peft_model.named_parameters() if "lora_" in n]
        modes = [(m, m.training) for m in peft_model.modules()]
        peft_model.set_adapter(self.adapter_name, inference_mode=True)
        peft_model.eval()
        try:
            yield
        finally:
            peft_model.set_adapter(previous)
            for param, requires_grad in adapter_grads:
                param.requires_grad_(requires_grad)
            for module, training in modes:
                module.training = training

    @torch.no_grad()
    def score_detailed(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        with_variance: bool = True,
        with_features: bool = False,
        **model_inputs: Any,
    ) -> HeadsOutput:
        """`ModelWithHeads.score_detailed` through the reward adapter."""
        with self.reward_adapter_active():
            hidden = self.policy.hidden_states(input_ids, attention_mask, **model_inputs)
        last = last_token_hidden(hidden, attention_mask).float().to(self.device)
        mean = self.value_head(last)
        variance = self.variance_head(last) if (with_variance and self.variance_head is not None) else None
        return HeadsOutput(hidden, mean, variance, features=last if with_features else None)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any):
        return self.score(input_ids, attention_mask, **kwargs)


def attach_reward_adapter(
    policy: ModelWithHeads,
    reward_dir: str,
    reward_base: str | None,
    has_variance: bool,
    cache_dir: str | None = None,
    adapter_name: str = REWARD_ADAPTER_NAME,
) -> SharedBaseRewardModel:
    """Load the LoRA reward adapter in `reward_dir` as `adapter_name` on the LoRA `policy`'s base, with its heads.

    `reward_base` is the base the adapter names (None: unknown). Raises ConfigError when the policy is not a LoRA
    model or the adapter was trained on another base; CheckpointError when the adapter does not fit the base.
    """

    if not policy.is_peft:
        raise ConfigError("A reward adapter can share the policy's base only when the policy is a LoRA model "
                          "(`finetuning_type: lora`).")  # fmt: skip
    policy_base = policy.heads_config.get("base_model_name_or_path")
    if reward_base is not None and not same_base(reward_base, policy_base):
        raise ConfigError(
            f"`reward_model_type: lora` puts the reward adapter `reward_model: {reward_dir}` on the policy's base, but "
            f"the adapter was trained on `{reward_base}` and the policy's base is `{policy_base}`. Train the reward "
            "model on the policy's base, or set `reward_model_type: full` to load it on its own base (a second copy "
            "of a base in memory)."
        )
    peft_model = policy.backbone
    if adapter_name in peft_model.peft_config:
        raise ConfigError(f"The policy already has an adapter named {adapter_name!r}; it cannot also hold the reward "
                          "adapter.")  # fmt: skip
    try:
        with torch.random.fork_rng(devices=[]):
            peft_model.load_adapter(reward_dir, adapter_name=adapter_name, is_trainable=False)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise CheckpointError(
            f"Could not load the LoRA reward adapter `reward_model: {reward_dir}` on the policy's base "
            f"`{policy_base}`: {' '.join(str(e).split())}"
        ) from None
    hidden = policy.config.get_text_config().hidden_size
    device = policy.value_head.summary.weight.device if policy.value_head is not None else policy.device
    heads_config = {"hidden_size": hidden, "base_model_name_or_path": policy_base}
    model = SharedBaseRewardModel(policy, build_heads(hidden, reward_heads(has_variance)), adapter_name, heads_config)
    load_heads(model, reward_dir, cache_dir)  # type: ignore[arg-type]  (reads value_head / variance_head only)
    model.requires_grad_(False)
    return model.to(device).eval()
