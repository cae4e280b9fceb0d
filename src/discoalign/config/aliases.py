"""Key names users bring from LlamaFactory and TRL.

A key with an exact equivalent here is renamed (and a note logged); a key without one gets an error that says
what to use instead. Without this table "did you mean" would suggest unrelated keys by spelling alone
(`template` -> `temperature`, `ref_model` -> `reward_model`).
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError

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
}

# name -> what to do instead (no key of ours means the same thing).
NO_EQUIVALENT: dict[str, str] = {
    "template": "discoalign renders prompts with the tokenizer's own chat template (`chat_template` in "
    "tokenizer_config.json or chat_template.jinja of `model_name_or_path`), or a plain `User:` / `Assistant:` "
    "template when it has none. Remove `template`; to change the template, edit the tokenizer's.",
    "max_prompt_length": "the prompt has no length of its own here: prompt + the longer response are fitted into "
    "`cutoff_len`, the prompt cut from the left first. Remove `max_prompt_length` and set `cutoff_len`.",
    "max_completion_length": "responses are fitted into `cutoff_len` together with the prompt (cut from the right). "
    "Remove `max_completion_length` and set `cutoff_len`.",
    "logging_dir": "transformers 5 removed it from TrainingArguments. TensorBoard logs (`report_to: tensorboard`) "
    "go to `output_dir/runs/`, or to the folder in the environment variable TENSORBOARD_LOGGING_DIR. Remove "
    "`logging_dir`.",
    "flash_attn": "use `attn_implementation` (eager, sdpa or flash_attention_2).",
    "preprocessing_num_workers": "data is converted in the main process (it is checked row by row); remove it.",
    "overwrite_cache": "discoalign keeps no tokenised-data cache; remove it.",
}


def apply_aliases(merged: dict[str, Any], source: str) -> tuple[dict[str, Any], list[str]]:
    """Rename exact aliases to our keys; raise ConfigError for names that have no equivalent.

    Returns the renamed dict and the notes to log (one per renamed key).
    """
    missing = [k for k in merged if k in NO_EQUIVALENT]
    if missing:
        key = missing[0]
        raise ConfigError(f"Config key `{key}` in {source} (a LlamaFactory/TRL key) has no equivalent here: "
                          f"{NO_EQUIVALENT[key]}")  # fmt: skip
    out: dict[str, Any] = {}
    notes: list[str] = []
    for key, value in merged.items():
        if key not in EXACT_ALIASES:
            out[key] = value
            continue
        ours, origin = EXACT_ALIASES[key]
        if ours in merged:
            raise ConfigError(
                f"{source} sets both `{key}` ({origin}'s name) and `{ours}`, which mean the same thing; keep `{ours}`."
            )
        out[ours] = value
        notes.append(f"`{key}` ({origin}'s name) is read as `{ours}: {value}`.")
    return out, notes
