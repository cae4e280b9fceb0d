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
    if ft.stage == "ppo":
        fail("`stage: ppo` is not available in this version of discoalign; use `rm` or `dpo`.")
    if not model.model_name_or_path:
        fail("`model_name_or_path` is empty; give a local directory, a hub name or builtin:tiny-<arch>.")
    return notes
