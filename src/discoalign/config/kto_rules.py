"""The rules of `stage: kto` (docs/kto.md), run before any model loads.

KTO's own keys (`kto_chosen_weight`, `kto_rejected_weight`) belong to it; the DPO loss's keys do not apply to it
and are refused by name (the heads are refused by the head registry, `precompute_ref_logps` and `simpo_gamma` by
their own rules). `pref_beta` is KTO's beta; the reference model is chosen as for DPO (`ref_model_name_or_path`,
else a frozen copy of the policy, or the base with the adapters off under LoRA).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .finetuning_groups import DPOArguments, KTOArguments
from .plan import schema_default

KTO_KEYS = tuple(f.name for f in dataclasses.fields(KTOArguments))
# The DPO loss's keys that mean nothing to KTO.
DPO_LOSS_KEYS = ("pref_loss", "label_smoothing", "pref_ftx", "pref_beta_mode")


def validate_kto(ft, training: dict[str, Any], fail) -> None:
    """Fail on a KTO key outside `stage: kto`, a DPO loss key inside it, or a training batch of one row."""
    changed = [k for k in KTO_KEYS if getattr(ft, k) != schema_default(KTOArguments, k)]
    if ft.stage != "kto":
        if changed:
            fail(f"{', '.join(f'`{k}`' for k in changed)} appl{'ies' if len(changed) == 1 else 'y'} to `stage: kto` "
                 f"only, not `stage: {ft.stage}`. Remove {'it' if len(changed) == 1 else 'them'} or set "
                 "`stage: kto`.")  # fmt: skip
        return
    for key in DPO_LOSS_KEYS:
        if getattr(ft, key) != schema_default(DPOArguments, key):
            fail(f"`{key}` is a key of the DPO loss and does not apply to `stage: kto` (its loss is fixed; "
                 "`pref_beta`, `kto_chosen_weight` and `kto_rejected_weight` set it). Remove it.")  # fmt: skip
    for key in KTO_KEYS:
        if getattr(ft, key) <= 0:
            fail(f"`{key}` is {getattr(ft, key)}; it must be positive.")
    batch = training.get("per_device_train_batch_size")  # unset: transformers' default, above 1
    if training.get("do_train") and batch is not None and int(batch) < 2:
        fail(f"`stage: kto` needs `per_device_train_batch_size` of 2 or more, not {batch}: the reference point z0 is "
             "estimated from each prompt paired with another row's completion of the same batch, so with one row "
             "it would be the row's own log-ratio (TRL refuses it too). For LlamaFactory's example (1 with "
             "`gradient_accumulation_steps: 8`) use `per_device_train_batch_size: 8` and "
             "`gradient_accumulation_steps: 1`, the same effective batch.")  # fmt: skip
