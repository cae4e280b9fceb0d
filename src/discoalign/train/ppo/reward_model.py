"""The frozen reward model of PPO: loading it from `reward_model`, and scoring prompt + response.

`reward_model` is a directory holding any reward model the checkpoints layer reads (DESIGN §5):
* ours (`stage: rm` output): full weights, or a LoRA adapter, with `heads.safetensors`;
* LlamaFactory / TRL value-head checkpoints (`value_head.safetensors` / `.bin`, `v_head.*` keys), the DiscoRM
  fork (`var_head.*`), and sequence-classification reward models.

`reward_model_type: lora` says the directory is a LoRA adapter (with its heads). With a LoRA policy it is loaded
as a second named adapter on the policy's own base (TRL's reward-adapter design, `models.reward_adapter`): one
base in memory for policy, reference and reward model; the adapter must have been trained on that base. With a
fully fine-tuned policy the adapter goes on top of the base its `adapter_config.json` names when that base is
available here (a `builtin:tiny-*` name or an existing directory), else on top of `model_name_or_path` (the
policy's base, LlamaFactory's convention).
`reward_model_type: full` loads the directory as it is (an adapter directory still works, on its named base).
A reward model on its own base loads unquantised and honours `device_map` (docs/quantization.md).

The reward is read at the last real token of prompt + response, found from the attention mask (the last
generated token before padding: never a pad token, whatever the pad id).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os

import torch

from ...errors import CheckpointError, ConfigError
from ...models.checkpoint import ADAPTER_CONFIG_NAME, load_heads, read_heads_config
from ...models.heads import ValueHead, VarianceHead, last_token_index
from ...models.interop import import_heads
from ...models.loader import load_model_with_heads
from ...models.model_with_heads import ModelWithHeads
from ...models.reward_adapter import SharedBaseRewardModel, attach_reward_adapter
from ...models.weight_files import read_json

logger = logging.getLogger(__name__)


def reward_heads_present(path: str, cache_dir: str | None = None) -> tuple[bool, bool]:
    """(has a value head, has a variance head) for a reward-model directory, ours or imported."""
    config = read_heads_config(path, cache_dir)
    if config is not None:
        return bool(config.get("value_head")), bool(config.get("variance_head"))
    imported = import_heads(path, cache_dir)
    if imported is None:
        return False, False
    return "value_head.summary.weight" in imported.tensors, "variance_head.summary.weight" in imported.tensors


def _check_reward_dir(name: str | None) -> str:
    if not name:
        raise ConfigError("`stage: ppo` needs `reward_model`: the directory of a reward model (e.g. one trained "
                          "with `stage: rm`, such as the output of examples/rm_bt.yaml).")
    if name.startswith("builtin:"):
        raise ConfigError(f"`reward_model: {name}` is a random built-in model without a trained reward head; train a "
                          "reward model first (`stage: rm`, e.g. examples/rm_bt.yaml) and point `reward_model` at its "
                          "output directory.")
    if os.path.isfile(name):
        raise CheckpointError(f"`reward_model: {name}` is a file; it must be a reward-model directory.")
    if not os.path.isdir(name):
        raise CheckpointError(f"`reward_model: {name}`: the directory does not exist (no network here, and hub "
                              "reward models must already be saved locally).")
    return name


def _usable_base(name: str | None) -> bool:
    return bool(name) and (name.startswith("builtin:tiny-") or os.path.isdir(name))


def _adapter_on_base(model_args, reward_dir: str, base_name: str, rm_ft, has_variance: bool) -> ModelWithHeads:
    """A LoRA reward adapter (+ its heads) on an explicitly named base model."""
    from peft import PeftModel

    base_args = copy.copy(model_args)
    base_args.model_name_or_path = base_name
    base_args.quantization_bit = None  # a reward model on its own base scores as it was trained
    bare_ft = dataclasses.replace(rm_ft, add_disco_head=False)
    base, _ = load_model_with_heads(base_args, bare_ft, add_value_head=False, is_trainable=False)
    try:
        backbone = PeftModel.from_pretrained(base.backbone, reward_dir, is_trainable=False)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise CheckpointError(
            f"Could not load the LoRA reward adapter `reward_model: {reward_dir}` on the base `{base_name}`: "
            f"{' '.join(str(e).split())}"
        ) from None
    hidden = backbone.get_base_model().config.get_text_config().hidden_size
    model = ModelWithHeads(
        backbone,
        ValueHead(hidden),
        VarianceHead(hidden) if has_variance else None,
        heads_config={"hidden_size": hidden, "base_model_name_or_path": base_name},
    )
    load_heads(model, reward_dir, getattr(model_args, "cache_dir", None))
    return model


def load_reward_model(
    model_args, finetuning_args, policy_tokenizer, policy: ModelWithHeads | None = None
) -> ModelWithHeads | SharedBaseRewardModel:
    """The frozen reward model named by `finetuning_args.reward_model`, in eval mode.

    With `reward_model_type: lora` and a LoRA `policy`, the reward adapter is loaded onto the policy's base (a
    `SharedBaseRewardModel`; ConfigError when the adapter was trained on another base).

    It gets a variance head exactly when the checkpoint has one. Built under a forked RNG, so loading it draws
    nothing from the run's random stream. Raises ConfigError / CheckpointError naming `reward_model` when the
    directory is not a reward model, is not an adapter with `reward_model_type: lora`, lacks the variance head
    that `disco_risk_coef > 0` needs, or tokenizes differently from the policy.
    """
    ft = finetuning_args
    reward_dir = _check_reward_dir(ft.reward_model)
    cache_dir = getattr(model_args, "cache_dir", None)
    has_value, has_variance = reward_heads_present(reward_dir, cache_dir)
    if not has_value:
        raise CheckpointError(
            f"`reward_model: {reward_dir}` holds no reward head: no heads.safetensors with a value head, no "
            "LlamaFactory/TRL value_head.safetensors (v_head.* keys), no sequence-classification `score`. Train a "
            "reward model with `stage: rm` and point `reward_model` at its output directory."
        )
    if ft.disco_risk_coef > 0 and not has_variance:
        raise ConfigError(
            f"`disco_risk_coef: {ft.disco_risk_coef}` subtracts the reward model's standard deviation, but "
            f"`reward_model: {reward_dir}` is a scalar reward model (no variance head). Use a Disco reward model "
            "(trained with `add_disco_head: true`, `disco_pref: true`) or set `disco_risk_coef: 0`."
        )
    adapter_config = os.path.join(reward_dir, ADAPTER_CONFIG_NAME)
    is_adapter = os.path.isfile(adapter_config)
    if ft.reward_model_type == "lora" and not is_adapter:
        raise CheckpointError(
            f"`reward_model_type: lora` but `reward_model: {reward_dir}` is not a LoRA adapter (it has no "
            f"{ADAPTER_CONFIG_NAME}). Use `reward_model_type: full` for a fully fine-tuned reward model."
        )

    rm_ft = dataclasses.replace(
        ft, finetuning_type="full", add_disco_head=has_variance, add_beta_head=False, disco_pref=False,
        use_dynamic_beta=False, head_dropout=0.0, head_init_std=None,
    )  # fmt: skip
    rm_args = copy.copy(model_args)
    rm_args.model_name_or_path = reward_dir
    rm_args.quantization_bit = None  # a reward model on its own base scores as it was trained
    with torch.random.fork_rng(devices=[]):
        named_base = read_json(adapter_config).get("base_model_name_or_path") if is_adapter else None
        if ft.reward_model_type == "lora" and policy is not None and policy.is_peft:
            if not _usable_base(named_base):
                logger.info("The reward adapter's base %r is not available here; it goes on the policy's base.",
                            named_base)  # fmt: skip
            shared = attach_reward_adapter(
                policy, reward_dir, named_base if _usable_base(named_base) else None, has_variance, cache_dir
            )
            logger.info("Reward adapter %s loaded on the policy's base as adapter %r (one base in memory).",
                        reward_dir, shared.adapter_name)  # fmt: skip
            return shared.eval()
        if is_adapter and not _usable_base(named_base):
            logger.info("The reward adapter's base %r is not available here; using `model_name_or_path: %s`.",
                        named_base, model_args.model_name_or_path)
            model = _adapter_on_base(model_args, reward_dir, model_args.model_name_or_path, rm_ft, has_variance)
            reward_tokenizer = policy_tokenizer
        else:
            model, reward_tokenizer = load_model_with_heads(rm_args, rm_ft, add_value_head=True, is_trainable=False)
    if reward_tokenizer.get_vocab() != policy_tokenizer.get_vocab():
        raise ConfigError(
            f"`reward_model: {reward_dir}` uses a tokenizer different from the policy's (`model_name_or_path: "
            f"{model_args.model_name_or_path}`); PPO scores the policy's token ids directly, so both must share one "
            "tokenizer."
        )
    model.requires_grad_(False)
    return model.eval()


def reward_token_index(query_mask: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """(B, P) and (B, L) masks -> (B,) position in prompt + response where the reward is read: the last real token."""
    return last_token_index(torch.cat([query_mask.long(), response_mask.long()], dim=1))


@torch.no_grad()
def score_responses(
    reward_model: ModelWithHeads,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reward (mean (B,), variance (B,) or None) of each prompt + response, read at `reward_token_index`."""
    input_ids = torch.cat([query_ids, response_ids], dim=1)
    attention_mask = torch.cat([query_mask.long(), response_mask.long()], dim=1)
    mean, variance = reward_model.score(input_ids, attention_mask, with_variance=reward_model.variance_head is not None)
    # A reward model split by `device_map` returns its scores on its last device; the rollout lives on the inputs'.
    return mean.to(query_ids.device), None if variance is None else variance.to(query_ids.device)
