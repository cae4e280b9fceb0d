"""Key names users bring from LlamaFactory and TRL, in four tables (applied by `config.compat`).

* `EXACT_ALIASES`: the same meaning under another name; renamed.
* `CONVERTED`: the same meaning written another way; rewritten (`warmup_ratio: 0.1` -> `warmup_steps: 0.1`).
* `IGNORED`: settings of machinery discoalign does not have; the run means the same without them.
* `NO_EQUIVALENT`: a setting that changes the run and that discoalign cannot honour; refused, with what to do.

Without these tables "did you mean" would suggest unrelated keys by spelling alone (`template` -> `temperature`,
`ref_model` -> `reward_model`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# name -> (our key, where the name comes from). Same meaning and same values, so the rename is safe.
EXACT_ALIASES: dict[str, tuple[str, str]] = {
    "ref_model": ("ref_model_name_or_path", "LlamaFactory"),
    "max_length": ("cutoff_len", "TRL"),
    "beta": ("pref_beta", "TRL"),
    "loss_type": ("pref_loss", "TRL"),
    "precompute_ref_log_probs": ("precompute_ref_logps", "TRL"),
    "dpo_label_smoothing": ("label_smoothing", "LlamaFactory"),
    "num_ppo_epochs": ("ppo_epochs", "TRL"),
    "response_length": ("max_new_tokens", "TRL"),
    "ppo_whiten_rewards": ("whiten_rewards", "LlamaFactory"),
    "desirable_weight": ("kto_chosen_weight", "TRL"),
    "undesirable_weight": ("kto_rejected_weight", "TRL"),
}

# stage -> {name: (our key, where the name comes from)}: TRL's names whose meaning depends on the stage; they
# take precedence over `EXACT_ALIASES` in that stage (`loss_type` is DPO's `pref_loss` elsewhere).
STAGE_ALIASES: dict[str, dict[str, tuple[str, str]]] = {
    "grpo": {"loss_type": ("grpo_loss_type", "TRL's GRPO")},
}

# `flash_attn` values (LlamaFactory) -> `attn_implementation` (None: the default choice, sdpa then eager).
FLASH_ATTN = {"auto": None, "disabled": "eager", "sdpa": "sdpa", "fa2": "flash_attention_2", "fa3": "flash_attention_3"}


def _warmup_ratio(value: Any) -> tuple[dict[str, Any], str] | str:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        return f"`warmup_ratio` is {value!r}; it must be a fraction in [0, 1)."
    return {
        "warmup_steps": float(value)
    }, "transformers 5 removed `warmup_ratio`; a `warmup_steps` below 1 is the ratio"


def _flash_attn(value: Any) -> tuple[dict[str, Any], str] | str:
    if value not in FLASH_ATTN:
        return f"`flash_attn` is {value!r}; LlamaFactory's values are {', '.join(FLASH_ATTN)}."
    impl = FLASH_ATTN[value]
    return ({"attn_implementation": impl} if impl else {}), "discoalign's name is `attn_implementation`"


# name -> function(value) giving (our keys, why) or an error message. Same meaning, written another way.
CONVERTED: dict[str, Callable[[Any], tuple[dict[str, Any], str] | str]] = {
    "warmup_ratio": _warmup_ratio,
    "flash_attn": _flash_attn,
}

# name -> why the run means the same without it. Accepted and dropped.
IGNORED: dict[str, str] = {
    "overwrite_cache": "discoalign keeps no tokenised-data cache; rows are converted afresh on every run",
    "preprocessing_num_workers": "rows are converted and checked one by one in the main process (a bad row is "
    "named by file and row), so there are no preprocessing workers",
    "use_fast_tokenizer": "the fast tokenizer is always used when the model has one",
    "low_cpu_mem_usage": "models are loaded the way transformers 5 loads them, which never holds two copies",
    "print_param_status": "the trainable parameter count is logged at the start of training",
}

# name -> what to do instead (no key of ours means the same thing).
NO_EQUIVALENT: dict[str, str] = {
    "max_prompt_length": "the prompt has no length of its own here: prompt + the longer response are fitted into "
    "`cutoff_len`, the prompt cut from the left first. Remove `max_prompt_length` and set `cutoff_len`.",
    "max_completion_length": "responses are fitted into `cutoff_len` together with the prompt (cut from the right). "
    "Remove `max_completion_length` and set `cutoff_len`.",
    "logging_dir": "transformers 5 removed it from TrainingArguments. TensorBoard logs (`report_to: tensorboard`) "
    "go to `output_dir/runs/`, or to the folder in the environment variable TENSORBOARD_LOGGING_DIR. Remove "
    "`logging_dir`.",
    "tokenized_path": "discoalign keeps no tokenised-data cache to save or load; remove it.",
    "streaming": "datasets are read whole (each row is checked before training); remove it.",
    "mix_strategy": "datasets named together are concatenated; interleaving is not supported. Remove it.",
    "rope_scaling": "RoPE scaling is not applied; `cutoff_len` is limited to the model's positions instead. Remove it.",
    "use_unsloth": "Unsloth is not supported; remove it.",
    "enable_liger_kernel": "Liger kernels are not supported; remove it (docs/performance.md lists the speed keys).",
    "neat_packing": "use `packing: true` (sequences kept apart by a block-diagonal mask, the same effect).",
    "train_on_prompt": "SFT trains on the response tokens only; remove it.",
    "ppo_score_norm": "the scores are not normalised; whiten the per-token rewards with `whiten_rewards: true`.",
    "ppo_target": "the KL coefficient is fixed (`pref_beta`) or steered per prompt (`use_dynamic_beta` with "
    "`target_kl`); there is no adaptive KL controller.",
    "ref_model_adapters": "a LoRA run's reference is its base with the adapters off; remove it.",
    "reward_model_adapters": "name the reward adapter's folder in `reward_model` with `reward_model_type: lora`.",
    "export_dir": "merging and exporting is its own command: `discoalign export --model DIR --out DIR`.",
}
