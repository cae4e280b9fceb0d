"""Import reward-model heads saved by other tools as our value (mean) and variance heads (docs/design.md §5).

Recognised layouts, all mapped to our keys `value_head.summary.*` / `variance_head.summary.*`:

* LlamaFactory / TRL legacy value-head wrapper: `value_head.safetensors` (or `value_head.bin`, read with
  `torch.load(weights_only=True)`) holding `v_head.summary.weight` (1, H) and `v_head.summary.bias` (1,).
  TRL's legacy wrapper may instead leave the `v_head.*` keys inside the model's own weight file
  (`model.safetensors` / `pytorch_model.bin`, possibly sharded) next to the backbone keys; under LoRA it
  writes them to `pytorch_model.bin` beside the adapter.
* The DiscoRM fork of LlamaFactory: `var_head.var.weight` / `var_head.var.bias`, with variance
  `softplus(raw)`. Our variance head computes `softplus(raw) + 1e-6`, so imported variances are larger
  by exactly 1e-6 (a floor that keeps the probit's denominator away from 0).
* `AutoModelForSequenceClassification` reward models (`config.architectures` ending in
  `ForSequenceClassification`): `score.weight` (1, H) and, where the model has one, `score.bias` become
  the value head (bias 0 otherwise); the backbone comes from the same weight file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..errors import CheckpointError
from .weight_files import load_tensor_file, locate_file, read_json, read_model_tensors

logger = logging.getLogger(__name__)

VALUE_HEAD_SAFE = "value_head.safetensors"
VALUE_HEAD_BIN = "value_head.bin"

# source key -> our key
_VALUE_HEAD_KEYS = {
    "v_head.summary.weight": "value_head.summary.weight",
    "v_head.summary.bias": "value_head.summary.bias",
}
_DISCORM_KEYS = {
    "var_head.var.weight": "variance_head.summary.weight",
    "var_head.var.bias": "variance_head.summary.bias",
}
_SEQ_CLS_KEYS = {"score.weight": "value_head.summary.weight", "score.bias": "value_head.summary.bias"}


@dataclass
class ImportedHeads:
    """Head tensors found in a foreign checkpoint, already renamed to our keys (fp32)."""

    tensors: dict[str, torch.Tensor]
    source: str  # the file they came from
    kind: str  # "value-head file", "weights with v_head keys", "sequence classification"


def is_sequence_classification(config_dict: dict) -> bool:
    """True when a config.json describes an `AutoModelForSequenceClassification` model."""
    return any(str(arch).endswith("ForSequenceClassification") for arch in config_dict.get("architectures") or [])


def _renamed(tensors: dict[str, torch.Tensor], mapping: dict[str, str]) -> dict[str, torch.Tensor]:
    return {mapping[key]: value.float() for key, value in tensors.items() if key in mapping}


def _check_pair(tensors: dict[str, torch.Tensor], head: str, source: str) -> None:
    """A head needs its weight as (1, H); a missing bias is allowed only for seq-cls (filled with 0 by the caller)."""
    weight = tensors.get(f"{head}.summary.weight")
    if weight is None:
        if f"{head}.summary.bias" in tensors:
            raise CheckpointError(f"{source!r} holds a bias for the {head.replace('_', ' ')} but no weight.")
        return
    bias = tensors.get(f"{head}.summary.bias")
    if weight.dim() != 2 or weight.shape[0] != 1 or (bias is not None and bias.numel() != 1):
        shapes = f"weight {tuple(weight.shape)}" + (f", bias {tuple(bias.shape)}" if bias is not None else "")
        raise CheckpointError(
            f"{source!r}: the {head.replace('_', ' ')} has {shapes}; a reward head must have a (1, hidden_size) weight "
            "and a single bias. A classifier with several labels is not a reward model."
        )


def import_heads(name_or_path: str, cache_dir: str | None = None) -> ImportedHeads | None:
    """Look for foreign value/variance head weights in a model dir or hub repo; None when there are none.

    Order: `value_head.safetensors`, `value_head.bin`, then the model's weight files (v_head/var_head keys,
    or `score.*` of a sequence-classification model).
    """
    for filename in (VALUE_HEAD_SAFE, VALUE_HEAD_BIN):
        path = locate_file(name_or_path, filename, cache_dir)
        if path is None:
            continue
        raw = load_tensor_file(path, keep=lambda k: k in _VALUE_HEAD_KEYS or k in _DISCORM_KEYS)
        tensors = {**_renamed(raw, _VALUE_HEAD_KEYS), **_renamed(raw, _DISCORM_KEYS)}
        if not tensors:
            raise CheckpointError(
                f"{path!r} holds none of the expected keys {', '.join(_VALUE_HEAD_KEYS)} (LlamaFactory / TRL value "
                "head format); the file is not a value-head checkpoint."
            )
        return _finish(ImportedHeads(tensors, path, "value-head file"))

    config_path = locate_file(name_or_path, "config.json", cache_dir)
    config_dict = read_json(config_path) if config_path else {}
    if is_sequence_classification(config_dict):
        raw, path = read_model_tensors(name_or_path, keep=lambda k: k in _SEQ_CLS_KEYS, cache_dir=cache_dir)
        tensors = _renamed(raw, _SEQ_CLS_KEYS)
        if "value_head.summary.weight" not in tensors:
            raise CheckpointError(
                f"{name_or_path!r} is a sequence-classification model (config.json architectures "
                f"{config_dict.get('architectures')}) but its weights hold no `score.weight`; cannot import it as a "
                "reward model."
            )
        tensors.setdefault("value_head.summary.bias", torch.zeros(1))
        return _finish(ImportedHeads(tensors, path or name_or_path, "sequence classification"))

    wanted = lambda k: k in _VALUE_HEAD_KEYS or k in _DISCORM_KEYS  # noqa: E731
    raw, path = read_model_tensors(name_or_path, keep=wanted, cache_dir=cache_dir)
    if raw:
        tensors = {**_renamed(raw, _VALUE_HEAD_KEYS), **_renamed(raw, _DISCORM_KEYS)}
        return _finish(ImportedHeads(tensors, path, "weights with v_head keys"))
    return None


def _finish(imported: ImportedHeads) -> ImportedHeads:
    for head in ("value_head", "variance_head"):
        _check_pair(imported.tensors, head, imported.source)
    for key, value in list(imported.tensors.items()):
        if key.endswith(".bias"):
            imported.tensors[key] = value.reshape(1)
    found = sorted({key.split(".", 1)[0] for key in imported.tensors})
    logger.info("Imported %s from %s (%s).", " and ".join(found), imported.source, imported.kind)
    return imported
