"""The rules of the reference-free losses (`pref_loss: simpo | orpo`), decided once (docs/dpo.md).

SimPO and ORPO load and run no reference model. Every key that needs one, or that changes the loss into another
member of the DPO family, is refused with one error that names it; the rest of the DPO keys apply unchanged:

| key | with simpo / orpo |
|---|---|
| `ref_model_name_or_path`, `precompute_ref_logps` | refused: there is no reference model |
| `add_beta_head`, `use_dynamic_beta` | refused: the beta head reads the reference's prompt features |
| `disco_pref` | refused: DiscoDPO is the probit member of the sigmoid loss |
| `pref_beta_mode: batch` | refused: beta-DPO is a baseline of the sigmoid loss |
| `add_disco_head` (without `disco_pref`) | supported: the variance head is saved and logged, the loss ignores it |
| `pref_ftx` | supported: `+ pref_ftx * (-log pi(y_w) / |y_w|)` |
| `label_smoothing` | simpo only (TRL's CPO `simpo`); refused with orpo by `config.validate` |
| `simpo_gamma` | simpo only: set with another `pref_loss` it is refused |
"""

from __future__ import annotations

from ..losses.reference_free import REFERENCE_FREE_LOSS_TYPES
from .plan import schema_default
from .schema import FinetuningArguments

# key -> (is it set?, why a reference-free loss refuses it)
_NO_REFERENCE = "SimPO and ORPO are reference-free: no reference model is loaded or run"
_REFUSED = {
    "ref_model_name_or_path": (lambda model, ft: bool(model.ref_model_name_or_path), _NO_REFERENCE),
    "precompute_ref_logps": (lambda model, ft: ft.precompute_ref_logps, _NO_REFERENCE + ", so there is nothing to "
                             "precompute"),
    "add_beta_head": (lambda model, ft: ft.add_beta_head, "the beta head reads the reference model's prompt "
                      "features, and " + _NO_REFERENCE),
    "use_dynamic_beta": (lambda model, ft: ft.use_dynamic_beta, "dynamic beta reads the reference model's prompt "
                         "features, and " + _NO_REFERENCE),
    "disco_pref": (lambda model, ft: ft.disco_pref, "DiscoDPO is the probit member of the sigmoid DPO loss"),
    "pref_beta_mode": (lambda model, ft: ft.pref_beta_mode == "batch", "beta-DPO (`pref_beta_mode: batch`) is a "
                       "baseline of the sigmoid DPO loss"),
}  # fmt: skip


def validate_reference_free(model, ft: FinetuningArguments, fail) -> None:
    """Refuse, naming the key, what `pref_loss: simpo | orpo` cannot do (module docstring); `simpo_gamma` without
    SimPO."""
    gamma_default = schema_default(FinetuningArguments, "simpo_gamma")
    if ft.simpo_gamma != gamma_default and not (ft.stage == "dpo" and ft.pref_loss == "simpo"):
        fail(f"`simpo_gamma` is SimPO's target margin and applies to `stage: dpo` with `pref_loss: simpo` only, not "
             f"`stage: {ft.stage}` with `pref_loss: {ft.pref_loss}`. Remove it or set `pref_loss: simpo`.")  # fmt: skip
    if ft.stage != "dpo" or ft.pref_loss not in REFERENCE_FREE_LOSS_TYPES:
        return
    for key, (is_set, why) in _REFUSED.items():
        if is_set(model, ft):
            fail(f"`{key}` cannot be used with `pref_loss: {ft.pref_loss}`: {why}. Remove `{key}`, or use a "
                 "reference-based loss (`pref_loss: sigmoid`).")  # fmt: skip
