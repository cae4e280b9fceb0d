"""Saving and loading a `ModelWithHeads` checkpoint (docs/design.md §5).

An output directory holds:
* the backbone: full weights via `save_pretrained` (safetensors), or only the PEFT adapter
  (`adapter_config.json` + `adapter_model.safetensors`) whose base is named in the adapter config;
* `heads.safetensors`: keys `value_head.summary.{weight,bias}`, `variance_head.summary.*`, `beta_head.summary.*`
  and the beta head's centring statistics `beta_head.feature_mean` (H,), `beta_head.feature_count` (),
  `beta_head.logit_offset` ();
* `heads_config.json`: which heads exist and their hyper-parameters, and `value_head_kind`: "reward" (a trained
  reward model, `stage: rm`) or "critic" (a PPO policy's value function, which is not a reward);
* `epistemic.safetensors` when the reward model has an epistemic term (`models.epistemic`), with its settings
  under `epistemic` in `heads_config.json`;
* the tokenizer, when one is given, and a multimodal model's image processor / feature extractor
  (`preprocessor_config.json`).

Compatibility rules when loading heads into a model:
* the checkpoint has a value head but no variance head, and the model wants one: the variance head stays
  fresh (sigma^2 = 1 everywhere) and a warning says so;
* the checkpoint has a variance head but the model has none (a scalar reward model): the mean is used and
  the variance ignored, which is logged.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch

from ..config.heads import HEAD_NAMES
from ..errors import CheckpointError
from .epistemic import EPISTEMIC_WEIGHTS_NAME, estimator_class
from .interop import import_heads
from .model_with_heads import ModelWithHeads
from .weight_files import load_tensor_file, locate_file, read_json, read_model_tensors

logger = logging.getLogger(__name__)

HEADS_WEIGHTS_NAME = "heads.safetensors"
HEADS_CONFIG_NAME = "heads_config.json"
ADAPTER_CONFIG_NAME = "adapter_config.json"


def heads_state_dict(model: ModelWithHeads) -> dict[str, torch.Tensor]:
    """`{"value_head.summary.weight": (1, H), "value_head.summary.bias": (1,), ...}` for the heads that exist."""
    out = {}
    for name in HEAD_NAMES:
        head = getattr(model, name)
        if head is not None:
            for key, value in head.state_dict().items():
                out[f"{name}.{key}"] = value.detach().to("cpu", torch.float32).contiguous()
    return out


def heads_config_of(model: ModelWithHeads) -> dict[str, Any]:
    """The JSON-able description written to `heads_config.json`: the loader's settings (`HeadPlan.settings`), which
    heads exist, the beta head's kind, and the epistemic estimator's settings."""
    config = dict(model.heads_config)
    for name in HEAD_NAMES:
        config[name] = getattr(model, name) is not None
    config.setdefault("hidden_size", model.config.get_text_config().hidden_size)
    if model.beta_head is not None:
        config["beta_head_epsilon"] = model.beta_head.epsilon
        config["beta_head_centered"] = model.beta_head.centered
    config.setdefault("base_model_name_or_path", getattr(model.causal_lm, "name_or_path", None))
    config["finetuning_type"] = "lora" if model.is_peft else "full"
    if model.epistemic is not None:
        config["epistemic"] = model.epistemic.config()
    else:
        config.pop("epistemic", None)
    return config


def save_checkpoint(
    model: ModelWithHeads,
    output_dir: str,
    tokenizer=None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> str:
    """Write backbone (full weights or PEFT adapter), `heads.safetensors`, `heads_config.json` and tokenizer.

    Args:
        model: the model to save (unwrapped from DDP / accelerate).
        output_dir: created if absent.
        tokenizer: saved alongside when given.
        state_dict: optional full state dict of `model` (keys `backbone.*`, `value_head.*`, ...), e.g. gathered
            by a distributed engine; by default the model's own.
    Returns:
        output_dir.
    """
    os.makedirs(output_dir, exist_ok=True)
    backbone_state = None
    heads_state = heads_state_dict(model)
    if state_dict is not None:
        backbone_state = {k[len("backbone.") :]: v for k, v in state_dict.items() if k.startswith("backbone.")}
        heads_state = {
            k: v.detach().to("cpu", torch.float32).contiguous()
            for k, v in state_dict.items()
            if k.split(".", 1)[0] in HEAD_NAMES
        }
    if model.is_peft:
        # "auto" would look the base model up (on the hub) to decide whether embeddings changed; ours never do.
        # Only the model's own adapter: a PPO policy may also carry the reward adapter (`models.reward_adapter`).
        model.backbone.save_pretrained(output_dir, state_dict=backbone_state, save_embedding_layers=False,
                                       selected_adapters=[model.backbone.active_adapter])  # fmt: skip
    else:
        model.backbone.save_pretrained(output_dir, state_dict=backbone_state)

    from safetensors.torch import save_file

    save_file(heads_state, os.path.join(output_dir, HEADS_WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(output_dir, HEADS_CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(heads_config_of(model), f, indent=2)
    if model.epistemic is not None:
        model.epistemic.save(output_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(output_dir)
    if getattr(model, "media_processor", None) is not None:
        # A multimodal checkpoint reloads offline with its own image processor / feature extractor.
        model.media_processor.save_pretrained(output_dir)
    return output_dir


def read_heads_config(name_or_path: str, cache_dir: str | None = None) -> dict[str, Any] | None:
    """`heads_config.json` of a checkpoint, or None when it has none."""
    path = locate_file(name_or_path, HEADS_CONFIG_NAME, cache_dir)
    return read_json(path) if path else None


def _checkpoint_head_tensors(name_or_path: str, cache_dir: str | None) -> tuple[dict[str, torch.Tensor], str | None]:
    """Our heads (heads.safetensors) or imported foreign ones; ({}, None) when the checkpoint has no heads."""
    config_path = locate_file(name_or_path, HEADS_CONFIG_NAME, cache_dir)
    weights_path = locate_file(name_or_path, HEADS_WEIGHTS_NAME, cache_dir)
    if config_path is None and weights_path is None:
        imported = import_heads(name_or_path, cache_dir)
        return (imported.tensors, imported.source) if imported else ({}, None)

    config = read_json(config_path) if config_path else {}
    flagged = [name for name in HEAD_NAMES if config.get(name)]
    if weights_path is None:
        if flagged:
            raise CheckpointError(
                f"Checkpoint {name_or_path!r} is incomplete: {HEADS_CONFIG_NAME} lists the {', '.join(flagged)} but "
                f"{HEADS_WEIGHTS_NAME} is missing."
            )
        return {}, config_path
    if config_path is None:
        logger.warning(
            "Checkpoint %r has %s but no %s; using the heads found in the weights.",
            name_or_path,
            HEADS_WEIGHTS_NAME,
            HEADS_CONFIG_NAME,
        )
    tensors = load_tensor_file(weights_path)
    absent = [name for name in flagged if f"{name}.summary.weight" not in tensors]
    if absent:
        raise CheckpointError(
            f"Checkpoint {name_or_path!r} is inconsistent: {HEADS_CONFIG_NAME} lists the {', '.join(absent)} but "
            f"{weights_path!r} holds no `{absent[0]}.summary.weight`."
        )
    return tensors, weights_path


def _copy_head(head: torch.nn.Module, name: str, tensors: dict[str, torch.Tensor], source: str) -> None:
    if name == "beta_head" and getattr(head, "centered", False):
        bias = tensors.get(f"{name}.summary.bias")
        if bias is not None and bias.abs().max() > 0:
            logger.warning(
                "%r holds an uncentred beta head (nonzero bias %s); this run's beta head is centred and has no "
                "bias, so the bias is dropped and s(x) keeps its mean of 1 over the data.",
                source,
                bias.tolist(),
            )
    optional = getattr(head, "OPTIONAL_STATE_KEYS", ())  # entries older checkpoints may lack (models/heads.py)
    for key, param in head.state_dict().items():
        full_key = f"{name}.{key}"
        if full_key not in tensors:
            if key in optional:
                continue
            raise CheckpointError(f"{source!r} has `{name}.summary.weight` but no `{full_key}`.")
        value = tensors[full_key]
        if value.numel() != param.numel() or (value.dim() == 2 and tuple(value.shape) != tuple(param.shape)):
            raise CheckpointError(
                f"{source!r}: `{full_key}` has shape {tuple(value.shape)} but this model's {name.replace('_', ' ')} "
                f"needs {tuple(param.shape)} (the checkpoint was trained on a backbone of another hidden size)."
            )
        with torch.no_grad():
            param.copy_(value.reshape(param.shape).to(param.dtype))


def load_heads(model: ModelWithHeads, checkpoint_dir: str, cache_dir: str | None = None) -> dict[str, str]:
    """Fill `model`'s heads from a checkpoint (ours, or a foreign reward model via `interop`).

    Returns, per head of the model or of the checkpoint: "loaded", "fresh" (model has it, checkpoint
    does not) or "ignored" (checkpoint has it, model does not). Applies the compatibility rules of the
    module docstring; raises CheckpointError on a corrupt, inconsistent or mis-shaped head file.
    """
    tensors, source = _checkpoint_head_tensors(checkpoint_dir, cache_dir)
    has = {name: f"{name}.summary.weight" in tensors for name in HEAD_NAMES}
    status: dict[str, str] = {}
    for name in HEAD_NAMES:
        head = getattr(model, name)
        if head is not None and has[name]:
            _copy_head(head, name, tensors, source)
            status[name] = "loaded"
        elif head is not None:
            status[name] = "fresh"
        elif has[name]:
            status[name] = "ignored"

    if status.get("variance_head") == "fresh" and has["value_head"]:
        logger.warning(
            "Checkpoint %r has a value head but no variance head; the variance head is created fresh "
            "(sigma^2 = 1 for every input) and will be learned from here.",
            checkpoint_dir,
        )
    if status.get("value_head") == "fresh" and any(has.values()):
        logger.warning("Checkpoint %r has no value head; the value head is created fresh.", checkpoint_dir)
    if status.get("variance_head") == "ignored":
        logger.warning(
            "Checkpoint %r has a variance head but this run has none (`add_disco_head: false`): it is used as a "
            "scalar reward model, the mean is used and the variance ignored.",
            checkpoint_dir,
        )
    for name in ("value_head", "beta_head"):
        if status.get(name) == "ignored":
            logger.info("Checkpoint %r has a %s that this run does not use; ignored.", checkpoint_dir, name)
    loaded = [name for name, s in status.items() if s == "loaded"]
    if loaded:
        logger.info("Loaded %s from %s.", ", ".join(loaded), source)
    # The epistemic term belongs to a reward model: a policy (no value head) initialised from one does not carry it.
    epistemic = load_epistemic(checkpoint_dir, cache_dir) if model.value_head is not None else None
    if epistemic is not None:
        model.epistemic = epistemic
        status["epistemic"] = "loaded"
    return status


def load_epistemic(name_or_path: str, cache_dir: str | None = None):
    """The checkpoint's epistemic estimator (`models.epistemic`), or None when it has none."""

    config = (read_heads_config(name_or_path, cache_dir) or {}).get("epistemic")
    if not config:
        return None
    path = locate_file(name_or_path, EPISTEMIC_WEIGHTS_NAME, cache_dir)
    if path is None:
        raise CheckpointError(
            f"Checkpoint {name_or_path!r} is incomplete: {HEADS_CONFIG_NAME} lists an epistemic term "
            f"({config.get('kind')}) but {EPISTEMIC_WEIGHTS_NAME} is missing."
        )
    return estimator_class(config.get("kind"), f"Checkpoint {name_or_path!r}: ").load(path, config)


def has_epistemic(model_or_path: Any, cache_dir: str | None = None) -> bool:
    """Whether a reward model has an epistemic term: a loaded model (its `epistemic` attribute) or a checkpoint
    folder (its `heads_config.json`, read without loading anything). The one answer PPO, `score`, `bon` and `serve`
    use."""
    if isinstance(model_or_path, (str, os.PathLike)):
        return bool((read_heads_config(str(model_or_path), cache_dir) or {}).get("epistemic"))
    return getattr(model_or_path, "epistemic", None) is not None


RUN_CONFIG_NAME = "discoalign_config.yaml"


def value_head_kind(name_or_path: str, cache_dir: str | None = None) -> str | None:
    """What a checkpoint's value head is: "reward" (trained reward model), "critic" (a PPO policy's value
    function), "none" (no value head: e.g. a DPO policy or a plain LM), or None when unknown (a foreign
    checkpoint with an imported head, taken as a reward model).

    Read from `heads_config.json` (`value_head_kind`); checkpoints written before that key existed are told
    apart by the `stage` of the run config saved beside them.
    """
    config = read_heads_config(name_or_path, cache_dir)
    if config is None:
        return None
    if not config.get("value_head"):
        return "none"
    kind = config.get("value_head_kind")
    if kind:
        return str(kind)
    run_config = locate_file(name_or_path, RUN_CONFIG_NAME, cache_dir)
    if run_config:
        import yaml

        try:
            with open(run_config, encoding="utf-8") as f:
                stage = (yaml.safe_load(f) or {}).get("stage")
        except (OSError, yaml.YAMLError):
            stage = None
        if stage == "ppo":
            return "critic"
        if stage == "rm":
            return "reward"
    return None


def _tied_names(module: torch.nn.Module) -> set[str]:
    """Names of state-dict entries that share storage with an earlier entry (tied embeddings)."""
    seen: dict[int, str] = {}
    tied = set()
    for key, value in module.state_dict(keep_vars=True).items():
        ptr = value.data_ptr()
        if ptr in seen:
            tied.add(key)
        else:
            seen[ptr] = key
    return tied


def _as_loaded_by_transformers(model: ModelWithHeads, checkpoint_dir: str) -> dict[str, torch.Tensor]:
    """The backbone state of a multimodal checkpoint under the model's own parameter names.

    transformers saves composite models in their original hub layout (Qwen2-VL's `model.language_model.layers.*`
    is written as `model.layers.*`) and renames on `from_pretrained`, so the file's keys cannot be loaded as they
    are; loading the checkpoint through the model's class applies the renaming.
    """
    dtype = next(model.causal_lm.parameters()).dtype
    with torch.random.fork_rng(devices=[]):  # nothing is left to initialise at random, but keep the run's stream
        loaded = type(model.causal_lm).from_pretrained(checkpoint_dir, dtype=dtype)
    return loaded.state_dict()


def load_checkpoint_weights(model: ModelWithHeads, checkpoint_dir: str) -> None:
    """Load a checkpoint written by `save_checkpoint` into an existing model of the same shape (for resuming).

    The backbone gets the adapter weights (LoRA) or the full weights; then the heads are loaded.
    """
    if not os.path.isdir(checkpoint_dir):
        raise CheckpointError(f"Checkpoint directory {checkpoint_dir!r} does not exist.")
    if model.is_peft:
        from peft import set_peft_model_state_dict

        path = next(
            (
                p
                for p in (os.path.join(checkpoint_dir, n) for n in ("adapter_model.safetensors", "adapter_model.bin"))
                if os.path.isfile(p)
            ),
            None,
        )
        if path is None:
            raise CheckpointError(
                f"Checkpoint {checkpoint_dir!r} has no adapter_model.safetensors, but the model being resumed is LoRA."
            )
        result = set_peft_model_state_dict(model.backbone, load_tensor_file(path))
        unexpected = list(getattr(result, "unexpected_keys", []) or [])
        if unexpected:
            raise CheckpointError(f"{path!r} holds adapter keys this model lacks, e.g. {unexpected[0]!r}.")
    else:
        state, path = read_model_tensors(checkpoint_dir, keep=lambda key: True)
        if path is None:
            raise CheckpointError(
                f"Checkpoint {checkpoint_dir!r} has no model.safetensors (or pytorch_model.bin), but the model being "
                "resumed is fully fine-tuned."
            )
        if getattr(model, "media_processor", None) is not None:
            state = _as_loaded_by_transformers(model, checkpoint_dir)
        result = model.causal_lm.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if k not in _tied_names(model.causal_lm)]
        if missing:
            raise CheckpointError(f"{path!r} lacks weights this model needs, e.g. {missing[0]!r}.")
    load_heads(model, checkpoint_dir)
