"""Build the tokenizer and a `ModelWithHeads` from the run's model and fine-tuning arguments.

`model_name_or_path` may be:
* `builtin:tiny-<arch>`: a tiny random model built in memory (seed 0, so every rebuild is identical);
* one of our checkpoints (full weights or a LoRA adapter + heads), a foreign reward model (LlamaFactory /
  TRL value head, DiscoRM, sequence classification; see `interop`), or any plain model directory;
* a hub name, through the usual `from_pretrained` path (offline here: it must be in the cache).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from typing import Any

import torch

from ..config.builtin_models import TINY_MULTIMODAL_ARCHS
from ..config.placement import check_no_offload, check_quantization, parse_device_map
from ..config.plan import HeadPlan
from ..errors import CheckpointError, ConfigError
from .backbone import (
    adapter_base,
    attach_adapters,
    builtin_arch,
    check_model_path,
    load_backbone,
    one_line,
    resolve_dtype,
    split_adapters,
)
from .checkpoint import load_heads, read_heads_config
from .gguf import load_gguf_tokenizer
from .heads import build_heads
from .lora import apply_lora
from .modality import ActorModality, detect_modality
from .model_with_heads import ModelWithHeads
from .multimodal_loader import build_media_processor, freeze_frozen_parts, trainable_parts
from .quantization import bnb_config, is_quantized, prepare_for_kbit_training
from .seq2seq import is_seq2seq_config
from .tiny import build_tiny_tokenizer
from .tiny_multimodal import build_tiny_multimodal_tokenizer
from .vocabulary import align_special_ids, apply_template
from .weight_files import locate_file

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


# ---- tokenizer -----------------------------------------------------------------------------------


def load_tokenizer(model_args):
    """The tokenizer for `model_args.model_name_or_path` (an adapter dir without one uses its base's).

    A tokenizer without a pad token gets pad = eos (the collators need a pad id; the mask, not the id,
    marks padding).
    """
    tokenizer = _load_tokenizer(model_args)
    if getattr(model_args, "template", None):
        apply_template(tokenizer, model_args.template)
    # Rows are tokenised whole and then truncated to `cutoff_len` (`data.encode`), which is limited to the model's
    # positions (`train.tuner`): the tokenizer's "longer than the specified maximum" warning does not apply.
    tokenizer.deprecation_warnings["sequence-length-is-longer-than-the-specified-maximum"] = True
    return tokenizer


def _load_tokenizer(model_args):
    name = os.path.expanduser(model_args.model_name_or_path)
    arch = builtin_arch(name)
    if arch:
        return build_tiny_multimodal_tokenizer(arch) if arch in TINY_MULTIMODAL_ARCHS else build_tiny_tokenizer()
    check_model_path(name)
    cache_dir = getattr(model_args, "cache_dir", None)
    has_own = any(locate_file(name, f, cache_dir) for f in TOKENIZER_FILES)
    base = adapter_base(name, cache_dir)
    if getattr(model_args, "gguf_file", None) and not has_own and base is None:
        return _with_pad(load_gguf_tokenizer(name, model_args.gguf_file), name)
    if not has_own and base is not None:
        base_args = copy.copy(model_args)
        base_args.model_name_or_path = base
        return _load_tokenizer(base_args)
    if not has_own and os.path.isdir(name):
        # AutoTokenizer would build an empty tokenizer here, and a run would train on zero tokens.
        raise CheckpointError(
            f"`model_name_or_path: {name}` has no tokenizer: none of {', '.join(TOKENIZER_FILES)} is in the folder. "
            "Copy the tokenizer files of the model it was trained from into it (`tokenizer.save_pretrained(folder)`)."
            + (
                " For a GGUF file, set `gguf_file:` to its name."
                if any(f.endswith(".gguf") for f in os.listdir(name))
                else ""
            )
        )

    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            name, trust_remote_code=bool(model_args.trust_remote_code), cache_dir=cache_dir
        )
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"Could not load a tokenizer from `model_name_or_path: {name}`: {one_line(e)} "
            "(no network here: a hub name must already be in the local cache)."
        ) from None
    if len(tokenizer) == 0:
        raise CheckpointError(f"The tokenizer of `model_name_or_path: {name}` has an empty vocabulary; its tokenizer "
                              "files are incomplete.")  # fmt: skip
    return _with_pad(tokenizer, name)


def _with_pad(tokenizer, name: str):
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
        logger.info("Tokenizer of %s has no pad token; using eos %r as pad.", name, tokenizer.eos_token)
    return tokenizer


# ---- the model -----------------------------------------------------------------------------------


def _checkpoint_chain(name: str, cache_dir: str | None) -> list[str]:
    """`name`, then the base of its adapter, and so on: where a multimodal model's processor files may be."""
    chain = [name]
    while len(chain) < 5 and builtin_arch(chain[-1]) is None:
        base = adapter_base(chain[-1], cache_dir)
        if base is None:
            break
        chain.append(base)
    return chain


def load_model_with_heads(
    model_args,
    finetuning_args,
    *,
    heads: HeadPlan | None = None,
    add_value_head: bool = False,
    is_trainable: bool = True,
    torch_dtype: Any = None,
):
    """Load (or build) the backbone, apply LoRA, create the heads and fill them from the checkpoint.

    Args:
        model_args: `ModelArguments` (model_name_or_path, trust_remote_code, attn_implementation, cache_dir).
        finetuning_args: `FinetuningArguments` (finetuning_type, lora_*, the multimodal towers).
        heads: which heads to create, with their settings (a run's `cfg.plan.heads`, or `HeadPlan.of(...)` for an
            inference-only model). None: the heads `finetuning_args`' `add_*` keys create, plus the value head
            when `add_value_head` (for scripts and tests).
        is_trainable: False freezes everything (reference or reward model) and adds no LoRA adapter.
        torch_dtype: backbone dtype; None means fp32. Heads are always fp32.
    Returns:
        (ModelWithHeads in eval mode, tokenizer).
    """
    if heads is None:
        heads = HeadPlan.from_keys(finetuning_args, value=add_value_head)
    name = os.path.expanduser(model_args.model_name_or_path)
    heads = _continued_beta_kind(heads, name, finetuning_args, getattr(model_args, "cache_dir", None))
    tokenizer = load_tokenizer(model_args)
    dtype = resolve_dtype(torch_dtype)
    load_kwargs = _placement_kwargs(model_args, finetuning_args, dtype, is_trainable)
    backbone = load_backbone(name, tokenizer, model_args, finetuning_args, dtype, is_trainable, 0, load_kwargs)
    adapters = split_adapters(getattr(model_args, "adapter_name_or_path", None))
    if adapters:
        backbone = attach_adapters(backbone, adapters, finetuning_args, is_trainable)

    backbone = _trainable_backbone(backbone, name, finetuning_args, is_trainable)

    from peft import PeftModel

    causal_lm = backbone.get_base_model() if isinstance(backbone, PeftModel) else backbone
    if getattr(model_args, "template", None):
        align_special_ids(causal_lm, tokenizer)
    hidden_size = causal_lm.config.get_text_config().hidden_size
    quantized = is_quantized(causal_lm)
    heads_config = {
        "hidden_size": hidden_size,
        **heads.settings(),
        "base_model_name_or_path": getattr(causal_lm, "name_or_path", None) or name,
        "finetuning_type": "lora" if isinstance(backbone, PeftModel) else "full",
    }
    modality = detect_modality(causal_lm.config)
    # Built after LoRA's init: only the value head draws random numbers (`build_heads`).
    model = ModelWithHeads(backbone, build_heads(hidden_size, heads), heads_config, modality=modality)
    if modality != ActorModality.LANGUAGE_ONLY:
        model.media_processor = build_media_processor(
            causal_lm,
            tokenizer,
            model_args,
            sources=_checkpoint_chain(name, getattr(model_args, "cache_dir", None)),
            supported=model.supported_parameters,
        )

    if builtin_arch(name) is None:
        _load_saved_heads(model, name, getattr(model_args, "cache_dir", None))
    if adapters and read_heads_config(adapters[-1], None):
        _load_saved_heads(model, adapters[-1], None)  # e.g. a reward model's LoRA trained further

    device_map = getattr(causal_lm, "hf_device_map", None)
    if device_map and "device_map" in load_kwargs:
        # `auto` decides the placement while loading; one that offloads to CPU or disk is refused here.
        check_no_offload({str(d) for d in device_map.values()})
    if quantized or "device_map" in load_kwargs:  # (transformers sets `hf_device_map` only for split models)
        model.place_heads_on_hidden_device()  # heads are fp32 and trainable; on the device of the last hidden state
    if not is_trainable:
        model.requires_grad_(False)
    return model.eval(), tokenizer


def _trainable_backbone(backbone, name: str, finetuning_args, is_trainable: bool):
    """The backbone as this run trains it: seq2seq models refused outside `stage: rm`, a quantised base prepared for
    k-bit training, LoRA applied (or a loaded adapter continued), a multimodal model's frozen parts frozen."""
    from peft import PeftModel

    base_lm = backbone.get_base_model() if isinstance(backbone, PeftModel) else backbone
    if is_trainable and is_seq2seq_config(base_lm.config) and finetuning_args.stage != "rm":
        raise ConfigError(
            f"`model_name_or_path: {name}` is an encoder-decoder (seq2seq) model; those are supported as reward "
            f"models (`stage: rm`, `score`, a PPO `reward_model`), not as the trained model of `stage: "
            f"{finetuning_args.stage}`."
        )
    if is_trainable and is_quantized(base_lm):
        # PEFT's preparation freezes every parameter; an adapter being resumed must stay trainable.
        resumed = [p for p in backbone.parameters() if p.requires_grad] if isinstance(backbone, PeftModel) else []
        prepare_for_kbit_training(base_lm)
        for param in resumed:
            param.requires_grad_(True)

    lora = finetuning_args.finetuning_type == "lora"
    if lora and is_trainable and not isinstance(backbone, PeftModel):
        return apply_lora(
            backbone,
            lora_rank=finetuning_args.lora_rank,
            lora_alpha=finetuning_args.lora_alpha,
            lora_dropout=finetuning_args.lora_dropout,
            lora_target=finetuning_args.lora_target,
            frozen_parts=trainable_parts(backbone, finetuning_args),  # None for text models
        )
    if lora and is_trainable:
        logger.info("Continuing to train the LoRA adapter loaded from %s.", name)
    elif is_trainable and not isinstance(backbone, PeftModel):
        freeze_frozen_parts(backbone, finetuning_args)  # a multimodal model's towers; no-op for text models
    return backbone


def _continued_beta_kind(heads: HeadPlan, name: str, finetuning_args, cache_dir: str | None) -> HeadPlan:
    """A checkpoint's beta head is continued with the kind it was trained with (`heads_config.json` records it;
    checkpoints from before `exp` existed have `tanh`): `beta_head_kind: auto` takes it, an explicit other kind is
    refused before the backbone loads (the head's weights mean different things under the two kinds). PPO's
    uncentred KL controller is always `tanh` and is not continued from a DPO head."""
    if not heads.has("beta_head") or not heads.beta_centered or builtin_arch(name) is not None:
        return heads
    saved = read_heads_config(name, cache_dir) or {}
    if not saved.get("beta_head"):
        return heads
    kind = saved.get("beta_head_kind") or "tanh"
    if kind == heads.beta_kind:
        return heads
    asked = getattr(finetuning_args, "beta_head_kind", None)  # None: a caller without the key (inference loaders)
    if asked not in (None, "auto"):
        raise ConfigError(
            f"The beta head of checkpoint {name!r} is `{kind}` (its heads_config.json, key `beta_head_kind`), but this "
            f"run sets `beta_head_kind: {asked}`; the head's weights mean different things under the two kinds. Set "
            f"`beta_head_kind: {kind}` (or `auto`) to continue that head, or start from a model without a beta head."
        )
    logger.info("Continuing the `%s` beta head of %s (`beta_head_kind: auto`).", kind, name)
    return dataclasses.replace(heads, beta_kind=kind)


def _load_saved_heads(model: ModelWithHeads, name: str, cache_dir: str | None) -> None:
    """Fill the heads from the checkpoint `name` (ours or a foreign reward model), warning when the beta head was
    trained with another epsilon."""
    checkpoint_config = read_heads_config(name, cache_dir) or {}
    saved_eps = checkpoint_config.get("beta_head_epsilon")
    if model.beta_head is not None and checkpoint_config.get("beta_head") and saved_eps != model.beta_head.epsilon:
        logger.warning("The beta head in %s was trained with beta_head_epsilon=%s; this run uses %s.", name,
                       saved_eps, model.beta_head.epsilon)  # fmt: skip
    load_heads(model, name, cache_dir)


def _placement_kwargs(model_args, finetuning_args, dtype, is_trainable: bool) -> dict[str, Any]:
    """`quantization_config` and `device_map` for `from_pretrained` (empty without `quantization_bit`/`device_map`).

    `device_map` applies to inference-only models (`is_trainable=False`: reward model, reference, `score`); the
    trained model is placed by the Trainer. A quantised model without one goes whole onto this process's device.
    """
    check_quantization(model_args, finetuning_args if is_trainable else _LoraLike())
    kwargs: dict[str, Any] = {}
    quantization = bnb_config(model_args, dtype)
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    device_map = parse_device_map(getattr(model_args, "device_map", None)) if not is_trainable else None
    world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world_size > 1 and (isinstance(device_map, str) or (isinstance(device_map, dict) and len(device_map) > 1)):
        raise ConfigError(
            f"`device_map: {model_args.device_map}` splits a model over several GPUs, which works in a single-process "
            f"run only; this run has {world_size} processes, each holding its own copy. Drop `device_map` (or run "
            "one process)."
        )
    if device_map is None and quantization is not None:
        local = int(os.environ.get("LOCAL_RANK", "0") or 0)
        device_map = {"": f"cuda:{local}" if torch.cuda.is_available() else "cpu"}
    if device_map is not None:
        kwargs["device_map"] = device_map
    return kwargs


class _LoraLike:
    """An inference-only model may load quantised whatever the run's finetuning_type (nothing of it trains)."""

    finetuning_type = "lora"
