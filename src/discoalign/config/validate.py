"""The decoupling rules of docs/design.md §4 and other cross-key checks, run before any model loads."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from ..errors import ConfigError, DataError
from .attention import check_attention_implementation
from .builtin_models import TINY_MULTIMODAL_ARCHS, TINY_SEQ2SEQ_ARCHS, is_builtin
from .dataset_info import load_dataset_info, registry_dir
from .finetuning_groups import GRPO_SHARED_PPO_KEYS, ONLINE_STAGES, DPOArguments, PPOArguments
from .heads import HEAD_SPECS, beta_epsilon_error, flip_prior_error
from .kto_rules import validate_kto
from .placement import check_quantization, parse_device_map
from .plan import schema_default
from .reference_free import validate_reference_free
from .schema import DataArguments, FinetuningArguments, ModelArguments
from .training_args import validate_deepspeed
from .validate_grpo import validate_grpo


def validate_combinations(
    model: ModelArguments,
    data: DataArguments,
    ft: FinetuningArguments,
    training: dict[str, Any],
    source: str,
) -> list[str]:
    """Raise ConfigError for a forbidden combination; return notes to log once for allowed-but-notable ones.

    One function per group of keys, each rule written once; the order decides which of several mistakes is named.
    """

    def fail(msg: str) -> None:
        raise ConfigError(f"In {source}: {msg}")

    # First, so that a PPO run with `disco_pref` hears about PPO, not about the missing variance head.
    notes = _validate_ppo(ft, fail)
    validate_reference_free(model, ft, fail)
    validate_kto(ft, training, fail)
    validate_grpo(ft, training, fail)
    _validate_sft(model, data, ft, fail)
    validate_deepspeed(ft, training, fail)
    notes += _validate_heads(ft, fail)
    _validate_reward_model(ft, fail)
    _validate_flip_rate(data, ft, fail)
    _validate_dpo(ft, fail)
    _validate_lora(ft, fail)
    _validate_data(model, data, ft, fail)
    notes += _validate_model_layer(model, data, ft, fail)
    _validate_outputs(model, data, ft, training, fail)
    return notes


def _validate_heads(ft: FinetuningArguments, fail) -> list[str]:
    """The head registry's rules (`config.heads.HEAD_SPECS`): stages, creation before use, ranges."""
    notes: list[str] = []
    refused = [(spec, k) for spec in HEAD_SPECS if ft.stage not in spec.stages for k in spec.keys if getattr(ft, k)]
    if refused:
        keys = [k for _, k in refused]
        reasons = dict.fromkeys(
            spec.refused.get(ft.stage, f"the {spec.name.replace('_', ' ')} belongs to "
                             f"{' and '.join(f'`stage: {s}`' for s in spec.stages)}.")
            for spec, _ in refused
        )  # fmt: skip
        joined = " and ".join(f"`{k}`" for k in keys) if len(keys) == 2 else ", ".join(f"`{k}`" for k in keys)
        fail(f"{joined} cannot be used with `stage: {ft.stage}`: {' '.join(reasons)}")
    for spec in HEAD_SPECS:
        if not (spec.add_key and spec.use_key):
            continue
        what = spec.name.replace("_", " ")
        if getattr(ft, spec.use_key) and not getattr(ft, spec.add_key):
            fail(f"`{spec.use_key}: true` uses the {what}, but `{spec.add_key}` is false, so the head does not "
                 f"exist. Set `{spec.add_key}: true` (or drop `{spec.use_key}`).")  # fmt: skip
        if getattr(ft, spec.add_key) and not getattr(ft, spec.use_key):
            notes.append(f"`{spec.add_key}: true` with `{spec.use_key}: false`: the {what} exists and is saved, but "
                         f"the loss does not use it; the numbers equal a run without the head.")  # fmt: skip
    epsilon_error = beta_epsilon_error(ft.beta_head_epsilon)
    if epsilon_error:
        fail(epsilon_error)
    if ft.beta_head_kind == "exp" and ft.add_beta_head and ft.stage != "dpo":
        fail(f"`beta_head_kind: exp` is DPO's centred beta head; `stage: {ft.stage}` uses the bounded `tanh` head.")
    if ft.beta_head_prior < 0:
        fail(f"`beta_head_prior` is {ft.beta_head_prior}; it must be 0 (off) or positive.")
    for spec in HEAD_SPECS:
        ratio = getattr(ft, spec.lr_ratio_key) if spec.lr_ratio_key else None
        if ratio is not None and ratio <= 0:
            fail(f"`{spec.lr_ratio_key}` is {ratio}; it must be positive.")
    if ft.disco_variance_prior < 0:
        fail(f"`disco_variance_prior` is {ft.disco_variance_prior}; it must be 0 (off) or positive.")
    if ft.head_dropout < 0 or ft.head_dropout >= 1:
        fail(f"`head_dropout` is {ft.head_dropout}; it must lie in [0, 1).")
    if ft.head_init_std is not None and ft.head_init_std <= 0:
        fail(f"`head_init_std` is {ft.head_init_std}; it must be positive (or unset for PyTorch's default init).")
    return notes


def _validate_flip_rate(data, ft: FinetuningArguments, fail) -> None:
    """The flip-rate head's prior, and the losses its forward correction applies to (docs/noisy_labels.md)."""
    prior_error = flip_prior_error(ft.flip_prior_mean, ft.flip_prior_strength)
    if prior_error:
        fail(prior_error)
    if not ft.use_flip_rate:
        return
    if ft.disco_pref:
        fail("`use_flip_rate: true` and `disco_pref: true` are two models of the same distrust (a flip rate and a "
             "variance); use one of them.")  # fmt: skip
    if ft.stage == "rm" and data.pack_pairs:
        fail("`use_flip_rate: true` with `stage: rm` reads the prompt of each unpacked chosen row; set "
             "`pack_pairs: false`.")  # fmt: skip
    if ft.stage == "dpo" and (ft.pref_loss != "sigmoid" or ft.label_smoothing):
        fail(f"`use_flip_rate: true` corrects the sigmoid loss for a learned flip rate; it replaces `label_smoothing` "
             f"and `pref_loss: robust`. Set `pref_loss: sigmoid` and `label_smoothing: 0` (now `pref_loss: "
             f"{ft.pref_loss}`, `label_smoothing: {ft.label_smoothing}`).")  # fmt: skip


def _validate_reward_model(ft: FinetuningArguments, fail) -> None:
    """`epistemic` is a property of a reward model."""
    if ft.epistemic != "none" and ft.stage != "rm":
        fail(
            f"`epistemic: {ft.epistemic}` is a property of a reward model and applies to `stage: rm` only; PPO uses "
            "the term saved with its `reward_model`. Remove it or set `stage: rm`."
        )


def _validate_dpo(ft: FinetuningArguments, fail) -> None:
    """The DPO family: beta, the loss, label smoothing, beta-DPO, the precomputed reference."""
    if ft.disco_pref and ft.stage == "dpo" and ft.pref_loss != "sigmoid":
        fail(
            f"`pref_loss: {ft.pref_loss}` cannot be combined with `disco_pref: true`: DiscoDPO is the probit member "
            "of the sigmoid family. Use `pref_loss: sigmoid` or set `disco_pref: false`."
        )
    if ft.pref_beta <= 0 and ft.stage != "grpo":  # GRPO: 0 is TRL's "no KL, no reference" (`validate_grpo`)
        fail(f"`pref_beta` is {ft.pref_beta}; it must be positive.")
    if not 0.0 <= ft.label_smoothing < 0.5:
        fail(f"`label_smoothing` is {ft.label_smoothing}; it must lie in [0, 0.5).")
    if ft.label_smoothing > 0 and ft.pref_loss not in ("sigmoid", "robust", "simpo"):
        fail(f"`label_smoothing` applies to `pref_loss: sigmoid`, `robust` and `simpo` only, not `{ft.pref_loss}`.")
    _validate_dr_dpo(ft, fail)
    if ft.pref_beta_mode == "batch":
        if ft.use_dynamic_beta or ft.disco_pref or ft.pref_loss != "sigmoid":
            clash = (
                "`use_dynamic_beta: true`"
                if ft.use_dynamic_beta
                else ("`disco_pref: true`" if ft.disco_pref else f"`pref_loss: {ft.pref_loss}`")
            )
            fail(
                f"`pref_beta_mode: batch` (beta-DPO, Wu et al. 2024) is a baseline for the logistic DPO loss and "
                f"cannot be combined with {clash}. Use `pref_loss: sigmoid` with `disco_pref: false` and "
                "`use_dynamic_beta: false`, or `pref_beta_mode: static`."
            )
        if ft.beta_dpo_alpha < 0:
            fail(f"`beta_dpo_alpha` is {ft.beta_dpo_alpha}; it must be 0 or more.")
        if not 0.0 <= ft.beta_dpo_filter < 1.0:
            fail(f"`beta_dpo_filter` is {ft.beta_dpo_filter}; it must lie in [0, 1) (the fraction of a batch dropped).")
    if ft.precompute_ref_logps and ft.stage != "dpo":
        fail("`precompute_ref_logps` applies to `stage: dpo` only.")
    if ft.logps_chunk_size < 0:
        fail(f"`logps_chunk_size` is {ft.logps_chunk_size}; it must be a positive number of tokens, or 0 for the "
             "plain full log-softmax.")  # fmt: skip


def _validate_dr_dpo(ft: FinetuningArguments, fail) -> None:
    """Dr. DPO's beta' (`dr_dpo_beta`): positive, and only where `pref_loss: dr_dpo` reads it."""
    if ft.dr_dpo_beta != schema_default(DPOArguments, "dr_dpo_beta") and not (
        ft.stage == "dpo" and ft.pref_loss == "dr_dpo"
    ):
        fail(f"`dr_dpo_beta` is Dr. DPO's beta' and applies to `stage: dpo` with `pref_loss: dr_dpo` only, not "
             f"`stage: {ft.stage}` with `pref_loss: {ft.pref_loss}`. Remove it or set `pref_loss: dr_dpo`.")  # fmt: skip
    if ft.dr_dpo_beta <= 0:
        fail(f"`dr_dpo_beta` is {ft.dr_dpo_beta}; Dr. DPO's beta' must be positive (large: DPO's mean over the batch, "
             "small: pairs with a large loss count less; 1.0 is Wu et al. 2025's default).")  # fmt: skip


def _validate_lora(ft: FinetuningArguments, fail) -> None:
    if ft.lora_rank <= 0:
        fail(f"`lora_rank` is {ft.lora_rank}; it must be a positive integer.")
    if not 0.0 <= ft.lora_dropout < 1.0:
        fail(f"`lora_dropout` is {ft.lora_dropout}; it must lie in [0, 1).")
    if ft.lora_alpha is not None and ft.lora_alpha <= 0:
        fail(f"`lora_alpha` is {ft.lora_alpha}; it must be positive (or unset for 2 * lora_rank).")


def _validate_data(model: ModelArguments, data: DataArguments, ft: FinetuningArguments, fail) -> None:
    """The data keys, and `pack_pairs` (caught here where the config alone says so; the trainer re-checks what only
    the loaded model can tell: its attention implementation and modality)."""
    if registry_dir(data.dataset_dir) is not None:
        try:
            load_dataset_info(data.dataset_dir)
        except DataError as e:
            fail(str(e))
    if data.cutoff_len < 2:
        fail(f"`cutoff_len` is {data.cutoff_len}; it must be at least 2 (one prompt and one response token).")
    if data.val_size < 0:
        fail(f"`val_size` is {data.val_size}; it must be 0 (no split), a fraction below 1, or a row count.")
    if data.max_samples is not None and data.max_samples <= 0:
        fail(f"`max_samples` is {data.max_samples}; it must be a positive integer.")
    if model.image_min_pixels < 1 or model.image_max_pixels < model.image_min_pixels:
        fail(
            f"`image_min_pixels` ({model.image_min_pixels}) must be at least 1 and at most `image_max_pixels` "
            f"({model.image_max_pixels})."
        )
    if data.pack_pairs:
        if ft.stage not in ("rm", "dpo"):
            fail(f"`pack_pairs` packs preference pairs and applies to `stage: rm` and `dpo`, not `{ft.stage}`.")
        if model.attn_implementation is not None:  # None: sdpa (or eager), decided when the model loads
            try:
                check_attention_implementation(model.attn_implementation)
            except ConfigError as e:
                fail(str(e))
        if is_builtin(model.model_name_or_path, TINY_MULTIMODAL_ARCHS):
            fail("`pack_pairs: true` supports text-only models; the built-in multimodal models are not. "
                 "Set `pack_pairs: false`.")  # fmt: skip


def _validate_outputs(
    model: ModelArguments, data: DataArguments, ft: FinetuningArguments, training: dict[str, Any], fail
) -> None:
    """Something to load, something to train or evaluate on, and an output folder that deletes nothing it reads."""
    if not model.model_name_or_path:
        fail("`model_name_or_path` is empty; give a local directory, a hub name or builtin:tiny-<arch>.")
    if training.get("do_train") and not data.dataset:
        what = "prompts" if ft.stage in ONLINE_STAGES else "preference pairs"
        fail(f"`do_train` is true but no training data is given: set `dataset` to a file or folder of {what}, or "
             "builtin:synthetic.")  # fmt: skip
    strategy = str(training.get("eval_strategy") or "no").lower()
    if training.get("do_train") and strategy != "no" and not (data.eval_dataset or data.val_size):
        fail(f"`eval_strategy: {strategy}` evaluates during training, but the run has no eval data: set "
             "`eval_dataset` (a file, a registry name or builtin:synthetic) or `val_size` (a fraction held out of "
             "`dataset`), or set `eval_strategy: no`.")  # fmt: skip
    if training.get("do_eval") and not training.get("do_train") and not (data.dataset or data.eval_dataset):
        fail("evaluation needs data: set `eval_dataset` (or `dataset`).")
    if ft.overwrite_output_dir and training.get("do_train"):
        out = os.path.abspath(os.path.expanduser(str(training.get("output_dir", ""))))
        for key in ("model_name_or_path", "ref_model_name_or_path", "reward_model"):
            value = getattr(model, key, None) or getattr(ft, key, None)
            if value and os.path.abspath(os.path.expanduser(value)) == out:
                fail(f"`overwrite_output_dir: true` would delete the model this run loads: `{key}` and `output_dir` "
                     f"are both {value!r}. Train into another `output_dir`.")  # fmt: skip
    for adapter in (model.adapter_name_or_path or "").split(","):
        path = os.path.expanduser(adapter.strip())
        if path and not os.path.isfile(os.path.join(path, "adapter_config.json")):
            fail(f"`adapter_name_or_path`: {path!r} is not a LoRA adapter folder (no adapter_config.json there).")
    if ft.overwrite_output_dir and training.get("resume_from_checkpoint"):
        fail("`overwrite_output_dir: true` would delete the checkpoints that `resume_from_checkpoint` resumes from; "
             "set only one of them.")  # fmt: skip


def _validate_model_layer(model: ModelArguments, data: DataArguments, ft: FinetuningArguments, fail) -> list[str]:
    """`quantization_bit` / `quantization_type` / `double_quantization` (QLoRA), `device_map` (docs/quantization.md)
    and the built-in seq2seq model (docs/reward_modeling.md), before any model loads. A seq2seq model from a
    directory is checked when it loads."""
    if is_builtin(model.model_name_or_path, TINY_SEQ2SEQ_ARCHS):
        if ft.stage != "rm":
            fail(f"`model_name_or_path: {model.model_name_or_path}` is an encoder-decoder (seq2seq) model; those are "
                 "supported as reward models (`stage: rm`, `score`, a PPO `reward_model`), not for "
                 f"`stage: {ft.stage}`.")  # fmt: skip
        if data.pack_pairs:
            fail("`pack_pairs: true` supports decoder-only models; an encoder-decoder (seq2seq) reward model cannot "
                 "pack pairs. Set `pack_pairs: false`.")  # fmt: skip

    try:
        check_quantization(model, ft)
        parse_device_map(model.device_map)
    except ConfigError as e:
        fail(str(e))
    notes = []
    if model.quantization_bit is None and (model.quantization_type != "nf4" or not model.double_quantization):
        notes.append("`quantization_type` / `double_quantization` apply with `quantization_bit: 4` only; without "
                     "`quantization_bit` the base is not quantised.")  # fmt: skip
    elif model.quantization_bit == 8 and (model.quantization_type != "nf4" or not model.double_quantization):
        notes.append("`quantization_type` / `double_quantization` apply to 4-bit bases; `quantization_bit: 8` uses "
                     "bitsandbytes' int8 layers.")  # fmt: skip
    if model.device_map is not None and ft.stage in ("rm", "dpo") and not model.ref_model_name_or_path:
        notes.append(
            f"`device_map: {model.device_map}` places inference-only models (the reward model, a reference "
            "model, `discoalign score`); the model this run trains is placed by the Trainer."
        )
    return notes


def _validate_sft(model: ModelArguments, data: DataArguments, ft: FinetuningArguments, fail) -> None:
    """Stage `sft`: `packing` and `sft_responses` belong to it (its heads are refused by `_validate_heads`)."""
    if ft.stage == "sft":
        if data.pack_pairs:
            fail("`pack_pairs` packs preference pairs (stage rm / dpo); for `stage: sft` use `packing: true`.")
    else:
        if data.packing:
            fail(
                f"`packing` applies to `stage: sft` only, not `stage: {ft.stage}` (pairwise stages have `pack_pairs`)."
            )
        if data.sft_responses != "chosen":
            fail(f"`sft_responses` applies to `stage: sft` only, not `stage: {ft.stage}`.")
    if data.packing and model.attn_implementation not in (None, "sdpa", "eager"):
        fail(
            f"`packing: true` needs `attn_implementation` sdpa or eager (a block-diagonal attention mask), not "
            f"`{model.attn_implementation}`. Set `packing: false`."
        )


# Keys that only `stage: ppo` reads (its group, PPOArguments); setting one elsewhere is a mistake worth a clear error.
PPO_ONLY_KEYS = tuple(f.name for f in dataclasses.fields(PPOArguments))


def _validate_ppo(ft: FinetuningArguments, fail) -> list[str]:
    """The PPO keys: only with `stage: ppo` (their sampling and reward keys also with `grpo`), in range, and a
    reward model named (`grpo`: `validate_grpo` says what it needs)."""
    if ft.stage != "ppo":
        defaults = PPOArguments()
        allowed = GRPO_SHARED_PPO_KEYS if ft.stage in ONLINE_STAGES else ()
        changed = [k for k in PPO_ONLY_KEYS if k not in allowed and getattr(ft, k) != getattr(defaults, k)]
        if changed:
            also = " (`stage: grpo` reads the sampling and reward keys; its own are num_iterations, epsilon, ...)"
            fail(
                f"{', '.join(f'`{k}`' for k in changed)} appl{'ies' if len(changed) == 1 else 'y'} to `stage: ppo` "
                f"only, not `stage: {ft.stage}`{also if allowed else ''}. Remove {'it' if len(changed) == 1 else 'them'}"
                " or set `stage: ppo`."
            )
        if not allowed:
            return []
    if ft.stage == "ppo" and not ft.reward_model:
        fail(
            "`stage: ppo` needs `reward_model`: the directory of a trained reward model (for example the output "
            "of `discoalign train examples/rm_bt.yaml`)."
        )
    positive_ints = {"max_new_tokens": ft.max_new_tokens, "ppo_epochs": ft.ppo_epochs,
                     "ppo_buffer_size": ft.ppo_buffer_size}  # fmt: skip
    for key, value in positive_ints.items():
        if value < 1:
            fail(f"`{key}` is {value}; it must be a positive integer.")
    if ft.temperature <= 0:
        fail(f"`temperature` is {ft.temperature}; it must be positive ({ft.stage.upper()} samples its responses).")
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
    if ft.top_p < 1.0 or ft.top_k > 0:
        # As in LlamaFactory and OpenRLHF. Log-probs under the truncated distribution would give a token that later
        # leaves the nucleus a log-prob of -inf; the full softmax keeps every ratio finite.
        keys = " and ".join(
            f"`{k}: {v}`" for k, v, off in (("top_p", ft.top_p, 1.0), ("top_k", ft.top_k, 0)) if v != off
        )
        notes.append(f"{keys}: responses are sampled from the truncated "
                     "distribution, while the log-probs, the PPO ratio and the KL are those of the full softmax (as "
                     "in LlamaFactory and OpenRLHF), so each rollout is slightly off-policy; `temperature` sharpens "
                     "sampling without that.")  # fmt: skip
    if ft.target_kl != FinetuningArguments().target_kl and not ft.use_dynamic_beta:
        notes.append(
            "`target_kl` is set but `use_dynamic_beta` is false: the KL coefficient is the fixed `pref_beta` "
            "and `target_kl` is not used."
        )
    return notes
