"""The frozen reward model of PPO: loading it from `reward_model`, and scoring prompt + response.

`reward_model` is a directory holding any reward model the checkpoints layer reads (docs/design.md §5):
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

The reward is read where the reward model was trained to read it: a response that ended on its stop token
gets the rest of the template's turn appended first (`data.position`; ChatML's `\n` after `<|im_end|>`),
then the last real token of prompt + response is scored, found from the attention mask (never from pad ids).

A folder whose value head is not a trained reward (a PPO policy's critic, `value_head_kind: critic` in
heads_config.json) or that has no value head (a DPO policy) is refused.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import torch

from ..config.plan import HeadPlan
from ..data.position import append_turn_suffix
from ..errors import CheckpointError, ConfigError
from .checkpoint import ADAPTER_CONFIG_NAME, has_epistemic, load_heads, read_heads_config, value_head_kind
from .epistemic import EpistemicInputs
from .heads import build_heads, last_token_index, reward_heads
from .interop import import_heads
from .loader import load_model_with_heads
from .model_with_heads import ModelWithHeads
from .reward_adapter import SharedBaseRewardModel, attach_reward_adapter
from .weight_files import read_json

logger = logging.getLogger(__name__)


def reward_heads_present(path: str, cache_dir: str | None = None) -> tuple[bool, bool]:
    """(has a trained reward head, has a variance head) for a reward-model directory, ours or imported.

    A PPO policy's value head is a critic, not a reward: it counts as no reward head.
    """
    config = read_heads_config(path, cache_dir)
    if config is not None:
        is_reward = bool(config.get("value_head")) and value_head_kind(path, cache_dir) in ("reward", None)
        return is_reward, bool(config.get("variance_head"))
    imported = import_heads(path, cache_dir)
    if imported is None:
        return False, False
    return "value_head.summary.weight" in imported.tensors, "variance_head.summary.weight" in imported.tensors


def _check_reward_dir(name: str | None) -> str:
    if not name:
        raise ConfigError(
            "`stage: ppo` needs `reward_model`: the directory of a reward model (e.g. one trained "
            "with `stage: rm`, such as the output of examples/rm_bt.yaml)."
        )
    if name.startswith("builtin:"):
        raise ConfigError(
            f"`reward_model: {name}` is a random built-in model without a trained reward head; train a "
            "reward model first (`stage: rm`, e.g. examples/rm_bt.yaml) and point `reward_model` at its "
            "output directory."
        )
    if os.path.isfile(name):
        raise CheckpointError(f"`reward_model: {name}` is a file; it must be a reward-model directory.")
    if not os.path.isdir(name):
        raise CheckpointError(
            f"`reward_model: {name}`: the directory does not exist (no network here, and hub "
            "reward models must already be saved locally)."
        )
    return name


def _usable_base(name: str | None) -> bool:
    return bool(name) and (name.startswith("builtin:tiny-") or os.path.isdir(name))


def _adapter_on_base(model_args, reward_dir: str, base_name: str, ft, has_variance: bool) -> ModelWithHeads:
    """A LoRA reward adapter (+ its heads) on an explicitly named base model."""
    from peft import PeftModel

    base_args = model_args.for_model(base_name)
    base_args.quantization_bit = None  # a reward model on its own base scores as it was trained
    base, _ = load_model_with_heads(base_args, ft, heads=HeadPlan.of(), is_trainable=False)
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
        build_heads(hidden, reward_heads(has_variance)),
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
    has_value, has_variance = check_reward_heads(reward_dir, "`reward_model: {}`", cache_dir)
    uses_variance = {"disco_risk_coef": "subtracts the reward model's standard deviation",
                     "uncertainty_shrinkage": "weights advantages by the reward model's variance"}  # fmt: skip
    for key, what in uses_variance.items():
        if getattr(ft, key, 0.0) > 0 and not (has_variance or has_epistemic(reward_dir, cache_dir)):
            raise ConfigError(
                f"`{key}: {getattr(ft, key)}` {what}, but `reward_model: {reward_dir}` is a scalar reward model (no "
                "variance head, no epistemic term). Use a Disco reward model (trained with `add_disco_head: true`, "
                f"`disco_pref: true`) or one trained with `epistemic: token_novelty`, or set `{key}: 0`."
            )
    adapter_config = os.path.join(reward_dir, ADAPTER_CONFIG_NAME)
    is_adapter = os.path.isfile(adapter_config)
    if ft.reward_model_type == "lora" and not is_adapter:
        raise CheckpointError(
            f"`reward_model_type: lora` but `reward_model: {reward_dir}` is not a LoRA adapter (it has no "
            f"{ADAPTER_CONFIG_NAME}). Use `reward_model_type: full` for a fully fine-tuned reward model."
        )

    rm_args = model_args.for_model(reward_dir, keep_template=False)
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
            logger.info(
                "The reward adapter's base %r is not available here; using `model_name_or_path: %s`.",
                named_base,
                model_args.model_name_or_path,
            )
            model = _adapter_on_base(model_args, reward_dir, model_args.model_name_or_path, ft, has_variance)
            reward_tokenizer = policy_tokenizer
        else:
            model, reward_tokenizer = load_model_with_heads(
                rm_args, ft, heads=reward_heads(has_variance), is_trainable=False
            )
    if reward_tokenizer.get_vocab() != policy_tokenizer.get_vocab():
        raise ConfigError(
            f"`reward_model: {reward_dir}` uses a tokenizer different from the policy's (`model_name_or_path: "
            f"{model_args.model_name_or_path}`); PPO scores the policy's token ids directly, so both must share one "
            "tokenizer."
        )
    model.requires_grad_(False)
    return model.eval()


def check_reward_heads(path: str, what: str, cache_dir: str | None = None) -> tuple[bool, bool]:
    """(True, has a variance head) for a folder with a trained reward head; CheckpointError naming `what`
    (a format string taking the path, e.g. "`reward_model: {}`") otherwise."""
    kind = value_head_kind(path, cache_dir)
    has_value, has_variance = reward_heads_present(path, cache_dir)
    name = what.format(path)
    if kind == "critic":
        raise CheckpointError(
            f"{name} is a PPO policy: its value head is the critic (heads_config.json `value_head_kind: critic`), "
            "an estimate of future reward under that policy, not a trained reward model. Point it at a reward "
            "model trained with `stage: rm`."
        )
    if not has_value:
        what_it_is = " (heads_config.json lists no value head: e.g. a DPO policy)" if kind == "none" else ""
        raise CheckpointError(
            f"{name} holds no reward head{what_it_is}: no heads.safetensors with a trained reward value head, no "
            "LlamaFactory/TRL value_head.safetensors (v_head.* keys), no sequence-classification `score`. Train a "
            "reward model with `stage: rm` and point at its output directory."
        )
    return has_value, has_variance


@dataclass
class RewardScores:
    """Per response: mean (B,), aleatoric variance (B,) of the Disco head or None, epistemic variance (B,) of
    the reward model's epistemic term or None. All fp32."""

    mean: torch.Tensor
    aleatoric: torch.Tensor | None = None
    epistemic: torch.Tensor | None = None

    def item(self, i: int) -> dict[str, float]:
        """Response i as `score` and `bon` write it: `mean` and, when the model has them, `aleatoric_variance`,
        `epistemic_variance`, `variance` (their sum) and `sigma`."""
        out = {"mean": float(self.mean[i])}
        if self.aleatoric is not None:
            out["aleatoric_variance"] = float(self.aleatoric[i])
        if self.epistemic is not None:
            out["epistemic_variance"] = float(self.epistemic[i])
        total = self.variance
        if total is not None:
            out["variance"] = float(total[i])
            out["sigma"] = math.sqrt(float(total[i]))
        return out

    @property
    def variance(self) -> torch.Tensor | None:
        """Total variance = aleatoric + epistemic (None when the model has neither)."""
        parts = [v for v in (self.aleatoric, self.epistemic) if v is not None]
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else parts[0] + parts[1]


def reward_token_index(query_mask: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """(B, P) and (B, L) masks -> (B,) position in prompt + response where the reward is read: the last real token."""
    return last_token_index(torch.cat([query_mask.long(), response_mask.long()], dim=1))


@torch.no_grad()
def score_responses_detailed(
    reward_model: ModelWithHeads,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    ended: torch.Tensor | None = None,
    turn_suffix: list[int] | tuple[int, ...] = (),
    pad_token_id: int = 0,
) -> RewardScores:
    """Mean, aleatoric and epistemic variance of each prompt + response.

    Args:
        query_ids, query_mask: (B, P) prompts, left-padded.
        response_ids, response_mask: (B, L) responses, right-padded.
        ended: (B,) bool, rows whose response ended on a stop token; with `turn_suffix` (see
            `data.position.turn_end_suffix`) those get the template's turn end appended before scoring.
            None: the responses are scored as given (already tokenised like training data).
        pad_token_id: written on padding added for the suffix.
    Returns:
        RewardScores read at `reward_token_index` of the (suffixed) sequence.
    """
    if ended is not None and turn_suffix:
        response_ids, response_mask = append_turn_suffix(
            response_ids, response_mask, ended, list(turn_suffix), pad_token_id
        )
    input_ids = torch.cat([query_ids, response_ids], dim=1)
    attention_mask = torch.cat([query_mask.long(), response_mask.long()], dim=1)
    estimator = reward_model.epistemic
    with_features = estimator is not None and estimator.needs_features
    out = reward_model.score_detailed(
        input_ids, attention_mask, with_variance=reward_model.variance_head is not None, with_features=with_features
    )
    # A reward model split by `device_map` returns its scores on its last device; the rollout lives on the inputs'.
    mean = out.mean.to(query_ids.device)
    aleatoric = None if out.variance is None else out.variance.to(query_ids.device)
    epistemic = None
    if estimator is not None:
        epistemic = estimator.variance(EpistemicInputs(response_ids, response_mask, out.features)).to(query_ids.device)
    return RewardScores(mean, aleatoric, epistemic)


@torch.no_grad()
def score_responses(
    reward_model: ModelWithHeads,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    ended: torch.Tensor | None = None,
    turn_suffix: list[int] | tuple[int, ...] = (),
    pad_token_id: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reward (mean (B,), total variance (B,) or None) of each prompt + response (see `score_responses_detailed`)."""
    scores = score_responses_detailed(
        reward_model, query_ids, query_mask, response_ids, response_mask, ended, turn_suffix, pad_token_id
    )
    return scores.mean, scores.variance
