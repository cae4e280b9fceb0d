"""The decoupling rules of DESIGN.md §4 and other cross-key checks, run before any model loads."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from .schema import DataArguments, FinetuningArguments, ModelArguments


def validate_combinations(
    model: ModelArguments,
    data: DataArguments,
    ft: FinetuningArguments,
    training: dict[str, Any],
    source: str,
) -> list[str]:
    """Raise ConfigError for a forbidden combination; return notes to log once for allowed-but-notable ones."""
    notes: list[str] = []

    def fail(msg: str) -> None:
        raise ConfigError(f"In {source}: {msg}")

    # First, so that a PPO run with `disco_pref` hears about PPO, not about the missing variance head.
    notes += _validate_ppo(ft, fail)
    _validate_sft(model, data, ft, fail)
    _validate_report_to(training, fail)

    if ft.disco_pref and not ft.add_disco_head:
        fail(
            "`disco_pref: true` uses the variance head, but `add_disco_head` is false, so the head does not "
            "exist. Set `add_disco_head: true` (or drop `disco_pref`)."
        )
    if ft.use_dynamic_beta and not ft.add_beta_head:
        fail(
            "`use_dynamic_beta: true` uses the beta head, but `add_beta_head` is false, so the head does not "
            "exist. Set `add_beta_head: true` (or drop `use_dynamic_beta`)."
        )
    if ft.stage == "rm" and (ft.add_beta_head or ft.use_dynamic_beta):
        keys = [k for k in ("add_beta_head", "use_dynamic_beta") if getattr(ft, k)]
        fail(
            f"{' and '.join(f'`{k}`' for k in keys)} cannot be used with `stage: rm`: reward modelling has no "
            "beta. The beta head belongs to `stage: dpo` (and `ppo`)."
        )
    if ft.disco_pref and ft.stage == "dpo" and ft.pref_loss != "sigmoid":
        fail(
            f"`pref_loss: {ft.pref_loss}` cannot be combined with `disco_pref: true`: DiscoDPO is the probit member "
            "of the sigmoid family. Use `pref_loss: sigmoid` or set `disco_pref: false`."
        )
    if ft.add_disco_head and not ft.disco_pref:
        notes.append(
            "`add_disco_head: true` with `disco_pref: false`: the variance head exists and is saved, but the loss "
            "does not use it; the numbers equal a run without the head."
        )
    if ft.add_beta_head and not ft.use_dynamic_beta:
        notes.append(
            "`add_beta_head: true` with `use_dynamic_beta: false`: the beta head exists and is saved, but beta is "
            "exactly `pref_beta`; the numbers equal a run without the head."
        )
    if not 0.0 < ft.beta_head_epsilon < 1.0:
        fail(f"`beta_head_epsilon` is {ft.beta_head_epsilon}; it must lie strictly between 0 and 1 so s(x) > 0.")
    if ft.beta_head_lr_ratio <= 0:
        fail(f"`beta_head_lr_ratio` is {ft.beta_head_lr_ratio}; it must be positive.")
    if ft.pref_beta <= 0:
        fail(f"`pref_beta` is {ft.pref_beta}; it must be positive.")
    if not 0.0 <= ft.label_smoothing < 0.5:
        fail(f"`label_smoothing` is {ft.label_smoothing}; it must lie in [0, 0.5).")
    if ft.label_smoothing > 0 and ft.pref_loss != "sigmoid":
        fail(f"`label_smoothing` applies to `pref_loss: sigmoid` only, not `{ft.pref_loss}`.")
    if ft.head_dropout < 0 or ft.head_dropout >= 1:
        fail(f"`head_dropout` is {ft.head_dropout}; it must lie in [0, 1).")
    if ft.head_init_std is not None and ft.head_init_std <= 0:
        fail(f"`head_init_std` is {ft.head_init_std}; it must be positive (or unset for PyTorch's default init).")
    if ft.lora_rank <= 0:
        fail(f"`lora_rank` is {ft.lora_rank}; it must be a positive integer.")
    if data.cutoff_len < 2:
        fail(f"`cutoff_len` is {data.cutoff_len}; it must be at least 2 (one prompt and one response token).")
    if data.val_size < 0:
        fail(f"`val_size` is {data.val_size}; it must be 0 (no split), a fraction below 1, or a row count.")
    if data.max_samples is not None and data.max_samples <= 0:
        fail(f"`max_samples` is {data.max_samples}; it must be a positive integer.")
    if ft.precompute_ref_logps and ft.stage != "dpo":
        fail("`precompute_ref_logps` applies to `stage: dpo` only.")
    if model.image_min_pixels < 1 or model.image_max_pixels < model.image_min_pixels:
        fail(
            f"`image_min_pixels` ({model.image_min_pixels}) must be at least 1 and at most `image_max_pixels` "
            f"({model.image_max_pixels})."
        )
    if ft.logps_chunk_size < 0:
        fail(f"`logps_chunk_size` is {ft.logps_chunk_size}; it must be a positive number of tokens, or 0 for the "
             "plain full log-softmax.")  # fmt: skip
    if data.pack_pairs:
        # Caught here, before a model loads, where the config alone says so; the trainer re-checks what only
        # the loaded model can tell (its actual attention implementation and modality).
        if ft.stage not in ("rm", "dpo"):
            fail(f"`pack_pairs` packs preference pairs and applies to `stage: rm` and `dpo`, not `{ft.stage}`.")
        if model.attn_implementation not in (None, "sdpa", "eager"):
            fail(
                f"`pack_pairs: true` needs `attn_implementation` sdpa or eager (an arbitrary attention mask), not "
                f"`{model.attn_implementation}`. Set `pack_pairs: false`, or use `group_by_length` instead."
            )
        from ..models.tiny_multimodal import TINY_MULTIMODAL_ARCHS

        if model.model_name_or_path in {f"builtin:tiny-{arch}" for arch in TINY_MULTIMODAL_ARCHS}:
            fail("`pack_pairs: true` supports text-only models; the built-in multimodal models are not. "
                 "Set `pack_pairs: false`.")  # fmt: skip
    if not model.model_name_or_path:
        fail("`model_name_or_path` is empty; give a local directory, a hub name or builtin:tiny-<arch>.")
    return notes


def _validate_report_to(training: dict[str, Any], fail) -> None:
    """`report_to: tensorboard` needs the package, named with its extra, before any model loads."""
    import importlib.util

    report_to = training.get("report_to")
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    if "tensorboard" in names and not any(importlib.util.find_spec(m) for m in ("tensorboard", "tensorboardX")):
        fail("`report_to: tensorboard` needs the tensorboard package, which is an optional extra: "
             "pip install 'discoalign[tensorboard]' (or pip install tensorboard). Or set `report_to: none`.")


def _validate_sft(model: ModelArguments, data: DataArguments, ft: FinetuningArguments, fail) -> None:
    """Stage `sft` trains the language model only: no heads; `packing` and `sft_responses` belong to it."""
    if ft.stage == "sft":
        heads = [k for k in ("add_disco_head", "add_beta_head", "disco_pref", "use_dynamic_beta") if getattr(ft, k)]
        if heads:
            fail(f"{', '.join(f'`{k}`' for k in heads)} cannot be used with `stage: sft`: supervised fine-tuning "
                 "trains the language model only and has no heads. Remove them, or use `stage: rm` / `dpo`.")
        if data.pack_pairs:
            fail("`pack_pairs` packs preference pairs (stage rm / dpo); for `stage: sft` use `packing: true`.")
    else:
        if data.packing:
            fail(f"`packing` applies to `stage: sft` only, not `stage: {ft.stage}` (pairwise stages have "
                 "`pack_pairs`).")
        if data.sft_responses != "chosen":
            fail(f"`sft_responses` applies to `stage: sft` only, not `stage: {ft.stage}`.")
    if data.packing and model.attn_implementation not in (None, "sdpa", "eager"):
        fail(f"`packing: true` needs `attn_implementation` sdpa or eager (a block-diagonal attention mask), not "
             f"`{model.attn_implementation}`. Set `packing: false`.")


# Keys that only `stage: ppo` reads; setting one elsewhere is a mistake worth a clear error.
PPO_ONLY_KEYS = (
    "reward_model", "reward_model_type", "max_new_tokens", "temperature", "top_p", "top_k", "ppo_epochs",
    "ppo_buffer_size", "gamma", "lam", "cliprange", "cliprange_value", "vf_coef", "whiten_rewards", "reward_clip",
    "missing_eos_penalty", "kl_estimator", "disco_risk_coef", "target_kl",
)  # fmt: skip


def _validate_ppo(ft: FinetuningArguments, fail) -> list[str]:
    """The PPO keys: only with `stage: ppo`, in range, and a reward model named."""
    if ft.stage != "ppo":
        defaults = FinetuningArguments()
        changed = [k for k in PPO_ONLY_KEYS if getattr(ft, k) != getattr(defaults, k)]
        if changed:
            fail(f"{', '.join(f'`{k}`' for k in changed)} appl{'ies' if len(changed) == 1 else 'y'} to `stage: ppo` "
                 f"only, not `stage: {ft.stage}`. Remove {'it' if len(changed) == 1 else 'them'} or set `stage: ppo`.")
        return []
    if not ft.reward_model:
        fail("`stage: ppo` needs `reward_model`: the directory of a trained reward model (for example the output "
             "of `discoalign train examples/rm_bt.yaml`).")
    if ft.disco_pref or ft.add_disco_head:
        keys = [k for k in ("add_disco_head", "disco_pref") if getattr(ft, k)]
        fail(f"{' and '.join(f'`{k}`' for k in keys)} cannot be used with `stage: ppo`: the policy has no variance "
             "head in PPO. The Disco variance comes from the reward model; `disco_risk_coef` decides how much it "
             "counts (reward = mean - disco_risk_coef * sqrt(variance)).")
    positive_ints = {"max_new_tokens": ft.max_new_tokens, "ppo_epochs": ft.ppo_epochs,
                     "ppo_buffer_size": ft.ppo_buffer_size}  # fmt: skip
    for key, value in positive_ints.items():
        if value < 1:
            fail(f"`{key}` is {value}; it must be a positive integer.")
    if ft.temperature <= 0:
        fail(f"`temperature` is {ft.temperature}; it must be positive (PPO samples its responses).")
    if not 0.0 < ft.top_p <= 1.0:
        fail(f"`top_p` is {ft.top_p}; it must lie in (0, 1] (1 disables nucleus sampling).")
    if ft.top_k < 0:
        fail(f"`top_k` is {ft.top_k}; it must be 0 (disabled) or a positive integer.")
    for key in ("gamma", "lam"):
        if not 0.0 <= getattr(ft, key) <= 1.0:
            fail(f"`{key}` is {getattr(ft, key)}; it must lie in [0, 1].")
    for key in ("cliprange", "cliprange_value", "target_kl"):
        if getattr(ft, key) <= 0:
            fail(f"`{key}` is {getattr(ft, key)}; it must be positive.")
    for key in ("vf_coef", "disco_risk_coef", "missing_eos_penalty"):
        value = getattr(ft, key)
        if value is not None and value < 0:
            fail(f"`{key}` is {value}; it must be non-negative.")
    if ft.reward_clip is not None and ft.reward_clip <= 0:
        fail(f"`reward_clip` is {ft.reward_clip}; it must be positive (or unset for no clipping).")
    notes = []
    if ft.target_kl != FinetuningArguments().target_kl and not ft.use_dynamic_beta:
        notes.append("`target_kl` is set but `use_dynamic_beta` is false: the KL coefficient is the fixed `pref_beta` "
                     "and `target_kl` is not used.")
    return notes
