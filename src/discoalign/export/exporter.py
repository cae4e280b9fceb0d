"""Export a checkpoint (ours or a foreign reward model) as a standalone model in one of three layouts.

* `ours`: full weights (`model.safetensors`) + `heads.safetensors` + `heads_config.json` + tokenizer; what
  `model_name_or_path` / `reward_model` of any stage loads, with no base model needed.
* `seq_cls`: `AutoModelForSequenceClassification` with `num_labels: 1` and `score.weight` = the value head's
  weight, which TRL's RewardTrainer, OpenRLHF and vLLM's reward serving read. transformers' `score` has no bias, so
  the value head's bias (a constant that pairwise losses never train) is not in `score`: plain transformers'
  logit = our mean - bias; the bias is written to config.json as `discoalign_value_head_bias`, and our own files
  (`heads.safetensors`, `heads_config.json`) are kept beside, so that our loader gets mean and variance exactly.
* `llamafactory`: the causal LM plus `value_head.safetensors` with `v_head.summary.{weight,bias}` (LlamaFactory /
  TRL's value-head wrapper) and, for a Disco model, the DiscoRM fork's `var_head.var.{weight,bias}`.

A LoRA checkpoint is loaded on its base and merged with peft's `merge_and_unload`; heads are copied as they are.
"""

from __future__ import annotations

import copy
import logging
import os
from typing import Any

import torch

from ..config.heads import HEAD_NAMES
from ..config.plan import HeadPlan
from ..config.schema import FinetuningArguments, ModelArguments
from ..errors import CheckpointError, ConfigError
from ..models.checkpoint import (
    HEADS_CONFIG_NAME,
    HEADS_WEIGHTS_NAME,
    heads_config_of,
    heads_state_dict,
    read_heads_config,
    save_checkpoint,
)
from ..models.interop import import_heads
from ..models.loader import load_model_with_heads

logger = logging.getLogger(__name__)

LAYOUTS = ("ours", "seq_cls", "llamafactory")
BIAS_KEY = "discoalign_value_head_bias"


def checkpoint_heads(model_dir: str) -> dict[str, Any]:
    """Which heads a checkpoint holds: {"value_head": bool, "variance_head": bool, "beta_head": bool, ...config}."""

    config = read_heads_config(model_dir)
    if config is not None:
        return {**config, **{name: bool(config.get(name)) for name in HEAD_NAMES}}
    imported = import_heads(model_dir)
    keys = imported.tensors if imported else {}
    return {name: f"{name}.summary.weight" in keys for name in HEAD_NAMES}


def load_merged(model_dir: str, dtype: str | None = None):
    """Load `model_dir` frozen with every head it has, LoRA merged. Returns (ModelWithHeads, tokenizer, heads)."""

    if not os.path.isdir(model_dir):
        raise CheckpointError(f"--model {model_dir!r} is not a directory holding a checkpoint.")
    heads = checkpoint_heads(model_dir)
    # Every head the checkpoint has, built with the settings it was trained with (a PPO policy's uncentred beta head
    # stays uncentred).
    plan = HeadPlan.from_heads_config(heads, tuple(name for name in HEAD_NAMES if heads.get(name)))
    model, tokenizer = load_model_with_heads(
        ModelArguments(model_name_or_path=model_dir), FinetuningArguments(), heads=plan, is_trainable=False,
        torch_dtype=dtype,
    )  # fmt: skip
    if model.is_peft:
        logger.info("Merging the LoRA adapter of %s into its base (peft merge_and_unload).", model_dir)
        model.backbone = model.backbone.merge_and_unload()
        model.heads_config["finetuning_type"] = "full"
    return model, tokenizer, heads


def _value_head_tensors(model) -> dict[str, torch.Tensor]:
    summary = model.value_head.summary
    return {name: getattr(summary, name).detach().float().cpu().clone() for name in ("weight", "bias")}


def _write_llamafactory(model, tokenizer, out_dir: str) -> None:
    from safetensors.torch import save_file

    model.causal_lm.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    value = _value_head_tensors(model)
    tensors = {"v_head.summary.weight": value["weight"], "v_head.summary.bias": value["bias"]}
    if model.variance_head is not None:
        # The DiscoRM fork of LlamaFactory: variance = softplus(var_head.var(h)); ours adds 1e-6 (interop.py).
        tensors["var_head.var.weight"] = model.variance_head.summary.weight.detach().float().cpu().clone()
        tensors["var_head.var.bias"] = model.variance_head.summary.bias.detach().float().cpu().clone()
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out_dir, "value_head.safetensors"),
              metadata={"format": "pt"})  # fmt: skip


def _write_our_heads(model, out_dir: str) -> None:
    """`heads.safetensors` + `heads_config.json` only (the backbone is written in another layout)."""
    import json

    from safetensors.torch import save_file

    save_file(heads_state_dict(model), os.path.join(out_dir, HEADS_WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(out_dir, HEADS_CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(heads_config_of(model), f, indent=2)


def _write_seq_cls(model, tokenizer, out_dir: str) -> float:
    """Write the AutoModelForSequenceClassification layout; returns the value-head bias left out of `score`."""
    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(model.causal_lm.config)
    config.num_labels = 1
    config.architectures = None
    config.pad_token_id = tokenizer.pad_token_id
    try:
        with torch.random.fork_rng(devices=[]):
            seq_cls = AutoModelForSequenceClassification.from_config(config, dtype=model.causal_lm.dtype)
    except ValueError as e:
        raise ConfigError(f"--layout seq_cls: transformers has no sequence-classification class for model type "
                          f"{config.model_type!r} ({' '.join(str(e).split())[:200]}).") from None  # fmt: skip
    body = model.causal_lm.base_model
    missing, unexpected = seq_cls.base_model.load_state_dict(body.state_dict(), strict=False)
    if missing or unexpected:
        raise CheckpointError(f"--layout seq_cls: the backbone's weights do not fit {type(seq_cls).__name__} "
                              f"(missing {missing[:2]}, unexpected {unexpected[:2]}).")  # fmt: skip
    value = _value_head_tensors(model)
    with torch.no_grad():
        seq_cls.score.weight.copy_(value["weight"].to(seq_cls.score.weight.dtype))
        if getattr(seq_cls.score, "bias", None) is not None:
            seq_cls.score.bias.copy_(value["bias"].to(seq_cls.score.bias.dtype))
    bias = 0.0 if getattr(seq_cls.score, "bias", None) is not None else float(value["bias"].item())
    setattr(seq_cls.config, BIAS_KEY, bias)
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id == tokenizer.eos_token_id:
        logger.warning(
            "The tokenizer's pad token is its EOS token: transformers' sequence classification reads the score at the "
            "last token that is not pad, so a response ending in EOS is scored one token early there. Give the "
            "tokenizer a distinct pad token for exact scores."
        )
    seq_cls.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    # Our files beside transformers' own: `discoalign` reloads mean (with its bias) and variance exactly.
    _write_our_heads(model, out_dir)
    return bias


def export_model(model_dir: str, out_dir: str, layout: str = "ours", dtype: str | None = None) -> dict[str, Any]:
    """Merge and export `model_dir` to `out_dir` in `layout` (see the module docstring).

    Args:
        model_dir: our checkpoint (full or LoRA adapter + heads), or a foreign reward model that `interop` reads.
        out_dir: created if absent; must not be `model_dir`.
        layout: "ours", "seq_cls" or "llamafactory".
        dtype: backbone dtype of the written weights (float32 when None; heads stay fp32).

    Returns:
        {"layout", "out_dir", "heads": [names], "merged_lora": bool, "value_head_bias" (seq_cls only)}.
    """

    if layout not in LAYOUTS:
        raise ConfigError(f"--layout {layout!r} is not one of {', '.join(LAYOUTS)}.")
    if os.path.abspath(out_dir) == os.path.abspath(model_dir):
        raise ConfigError(f"--out {out_dir!r} is the model directory itself; export to another directory.")
    heads = checkpoint_heads(model_dir) if os.path.isdir(model_dir) else None
    if layout != "ours" and heads is not None and not heads["value_head"]:
        raise CheckpointError(
            f"--layout {layout} writes a reward model, but {model_dir!r} has no value head (an SFT, DPO or PPO "
            "policy?). Export it with `--layout ours` (LoRA merged, a plain causal LM), or give a reward model."
        )
    model, tokenizer, heads = load_merged(model_dir, dtype)
    was_lora = os.path.isfile(os.path.join(model_dir, "adapter_config.json"))  # merged by load_merged
    if getattr(model, "media_processor", None) is not None and layout != "ours":
        raise ConfigError(f"--layout {layout} supports text models; export a multimodal model with `--layout ours`.")
    os.makedirs(out_dir, exist_ok=True)
    names = [n for n in ("value_head", "variance_head", "beta_head") if heads[n]]
    result: dict[str, Any] = {"layout": layout, "out_dir": out_dir, "merged_lora": was_lora, "heads": names}
    if layout == "ours":
        save_checkpoint(model, out_dir, tokenizer=tokenizer)
    elif layout == "llamafactory":
        if model.beta_head is not None:
            logger.warning("LlamaFactory's layout has no beta head; it is left out of %s.", out_dir)
        _write_llamafactory(model, tokenizer, out_dir)
    else:
        result["value_head_bias"] = _write_seq_cls(model, tokenizer, out_dir)
    return result
