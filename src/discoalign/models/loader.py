"""Build the tokenizer and a `ModelWithHeads` from the run's model and fine-tuning arguments.

`model_name_or_path` may be:
* `builtin:tiny-<arch>`: a tiny random model built in memory (seed 0, so every rebuild is identical);
* one of our checkpoints (full weights or a LoRA adapter + heads), a foreign reward model (LlamaFactory /
  TRL value head, DiscoRM, sequence classification; see `interop`), or any plain model directory;
* a hub name, through the usual `from_pretrained` path (offline here: it must be in the cache).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from collections.abc import Callable
from typing import Any

import torch

from ..errors import CheckpointError, ConfigError
from .checkpoint import ADAPTER_CONFIG_NAME, load_heads, read_heads_config
from .heads import BetaHead, ValueHead, VarianceHead
from .interop import is_sequence_classification
from .lora import apply_lora
from .modality import ActorModality, detect_modality
from .model_with_heads import ModelWithHeads
from .multimodal_loader import build_media_processor, freeze_frozen_parts, multimodal_auto_class, trainable_parts
from .quantization import (
    bnb_config,
    check_no_offload,
    check_quantization,
    is_quantized,
    parse_device_map,
    prepare_for_kbit_training,
)
from .seq2seq import is_seq2seq_config
from .tiny import TINY_ARCHS, TINY_SEQ2SEQ_ARCHS, build_tiny_model, build_tiny_tokenizer, write_tiny_model
from .tiny_multimodal import TINY_MULTIMODAL_ARCHS, build_tiny_multimodal_model, build_tiny_multimodal_tokenizer
from .weight_files import locate_file, read_json

logger = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:tiny-"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_warned_attn: set[str] = set()


# ---- names ---------------------------------------------------------------------------------------


def builtin_arch(name: str) -> str | None:
    """`builtin:tiny-llama` -> "llama"; None for other names; ConfigError for an unknown builtin."""
    if not name.startswith("builtin:"):
        return None
    arch = name[len(BUILTIN_PREFIX) :] if name.startswith(BUILTIN_PREFIX) else None
    known = TINY_ARCHS + TINY_SEQ2SEQ_ARCHS + TINY_MULTIMODAL_ARCHS
    if arch not in known:
        raise ConfigError(
            f"`model_name_or_path: {name}` is not a built-in model. The built-in models are "
            f"{', '.join(BUILTIN_PREFIX + a for a in known)}."
        )
    return arch


def _looks_like_path(name: str) -> bool:
    """Hub ids are `name` or `org/name`; anything else with a slash, or starting like a path, is a path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name or os.path.exists(name)


def _check_exists(name: str, key: str = "model_name_or_path") -> None:
    """A name that is clearly a path must be an existing directory (a hub id is `org/name`)."""
    if os.path.isfile(name):
        raise CheckpointError(f"`{key}: {name}` is a file; it must be a model directory (or a hub name).")
    if _looks_like_path(name) and not os.path.isdir(name):
        raise CheckpointError(f"`{key}: {name}`: the directory does not exist.")


def _adapter_base(name: str, cache_dir: str | None) -> str | None:
    """The base model of a PEFT adapter checkpoint, or None when `name` is not one."""
    path = locate_file(name, ADAPTER_CONFIG_NAME, cache_dir)
    if path is None:
        return None
    base = read_json(path).get("base_model_name_or_path")
    if not base:
        heads_config = read_heads_config(name, cache_dir) or {}
        base = heads_config.get("base_model_name_or_path")
    if not base:
        raise CheckpointError(
            f"Adapter checkpoint {name!r} does not say which base model it adapts: {path!r} has no "
            "`base_model_name_or_path`."
        )
    return base


# ---- tokenizer -----------------------------------------------------------------------------------


def load_tokenizer(model_args):
    """The tokenizer for `model_args.model_name_or_path` (an adapter dir without one uses its base's).

    A tokenizer without a pad token gets pad = eos (the collators need a pad id; the mask, not the id,
    marks padding).
    """
    name = os.path.expanduser(model_args.model_name_or_path)
    arch = builtin_arch(name)
    if arch:
        return build_tiny_multimodal_tokenizer(arch) if arch in TINY_MULTIMODAL_ARCHS else build_tiny_tokenizer()
    _check_exists(name)
    cache_dir = getattr(model_args, "cache_dir", None)
    has_own = any(locate_file(name, f, cache_dir) for f in TOKENIZER_FILES)
    base = _adapter_base(name, cache_dir)
    if not has_own and base is not None:
        base_args = copy.copy(model_args)
        base_args.model_name_or_path = base
        return load_tokenizer(base_args)
    if not has_own and os.path.isdir(name):
        # AutoTokenizer would build an empty tokenizer here, and a run would train on zero tokens.
        raise CheckpointError(
            f"`model_name_or_path: {name}` has no tokenizer: none of {', '.join(TOKENIZER_FILES)} is in the folder. "
            "Copy the tokenizer files of the model it was trained from into it (`tokenizer.save_pretrained(folder)`)."
        )

    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            name, trust_remote_code=bool(model_args.trust_remote_code), cache_dir=cache_dir
        )
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"Could not load a tokenizer from `model_name_or_path: {name}`: {_one_line(e)} "
            "(no network here: a hub name must already be in the local cache)."
        ) from None
    if len(tokenizer) == 0:
        raise CheckpointError(f"The tokenizer of `model_name_or_path: {name}` has an empty vocabulary; its tokenizer "
                              "files are incomplete.")  # fmt: skip
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
        logger.info("Tokenizer of %s has no pad token; using eos %r as pad.", name, tokenizer.eos_token)
    return tokenizer


# ---- backbone ------------------------------------------------------------------------------------


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def _resolve_dtype(torch_dtype: Any) -> Any:
    """None -> fp32 (master weights for training); strings like "bfloat16" -> torch dtypes; "auto" passes."""
    if torch_dtype is None:
        return torch.float32
    if isinstance(torch_dtype, str) and torch_dtype != "auto":
        dtype = getattr(torch, torch_dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise ConfigError(f"torch dtype {torch_dtype!r} is unknown; use float32, bfloat16, float16 or auto.")
        return dtype
    return torch_dtype


def _attn_candidates(requested: str | None) -> list[str | None]:
    if requested is None:
        return [None]
    if "flash" in requested or "/" in requested:  # flash_attention_2/3, or a hub kernel
        return [requested, "sdpa", "eager"]
    if requested == "sdpa":
        return ["sdpa", "eager"]
    return [requested]


def _with_attn_fallback(load: Callable[[str | None], Any], requested: str | None) -> Any:
    """`load(attn_implementation)`, falling back to sdpa then eager when the requested kernel is unavailable."""
    candidates = _attn_candidates(requested)
    for i, impl in enumerate(candidates):
        try:
            return load(impl)
        except (ImportError, ValueError) as e:
            message = _one_line(e)
            is_attn_error = impl is not None and (impl in message or "attention" in message.lower())
            if not is_attn_error:
                raise
            if i + 1 == len(candidates):
                raise ConfigError(
                    f"`attn_implementation: {requested}` cannot be used with this model: {message}"
                ) from None
            key = f"{impl}->{candidates[i + 1]}"
            if key not in _warned_attn:
                _warned_attn.add(key)
                logger.warning(
                    "attn_implementation %r is unavailable (%s); falling back to %r.", impl, message, candidates[i + 1]
                )
    raise AssertionError("unreachable")


@contextlib.contextmanager
def without_zero3_init():
    """Build a module whole, outside ZeRO-3's partition-at-construction (`deepspeed.zero.Init`, which transformers
    enters in `from_config` / `from_pretrained` while a ZeRO-3 config is active).

    For the built-in tiny models, whose weights are drawn from a seed: under `zero.Init` the draws differ, and
    `builtin:tiny-qwen3` would be another model under ZeRO-3 than anywhere else. Built whole, the DeepSpeed engine
    shards them when it starts. Weights read from files keep `zero.Init` (they load exactly either way).
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def _build_builtin(arch: str, tokenizer, model_args, dtype, load_kwargs: dict | None = None) -> torch.nn.Module:
    name = BUILTIN_PREFIX + arch
    if load_kwargs and arch in TINY_MULTIMODAL_ARCHS:
        raise ConfigError(
            f"`quantization_bit` / `device_map` are not supported with `model_name_or_path: {name}` (a built-in "
            "multimodal model); quantised and device-mapped loading is verified for text models only."
        )
    if load_kwargs and arch in TINY_ARCHS + TINY_SEQ2SEQ_ARCHS:
        # Quantisation and device maps happen while `from_pretrained` loads the weights: write the (deterministic)
        # tiny model to a temporary folder and load it from there like any other checkpoint.
        import tempfile

        with tempfile.TemporaryDirectory(prefix="discoalign-tiny-") as folder:
            write_tiny_model(arch, folder, seed=0)
            model = _from_pretrained(folder, model_args, dtype, load_kwargs)
    else:
        model = _build_builtin_in_memory(arch, tokenizer, model_args, dtype)
    model.name_or_path = name
    model.config._name_or_path = name
    return model


def _build_builtin_in_memory(arch: str, tokenizer, model_args, dtype) -> torch.nn.Module:
    def load(impl: str | None):
        # Seeded weights: the same model under DeepSpeed ZeRO-3 as anywhere else (the engine shards it later).
        with without_zero3_init():
            if arch in TINY_MULTIMODAL_ARCHS:
                model = build_tiny_multimodal_model(arch, tokenizer=tokenizer, seed=0)
            else:
                model = build_tiny_model(arch, tokenizer=tokenizer, seed=0)
        if impl is not None:
            model.set_attn_implementation(impl)
        return model

    model = _with_attn_fallback(load, model_args.attn_implementation)
    if dtype not in (None, "auto", torch.float32):
        model = model.to(dtype)
    return model


def _from_pretrained(name: str, model_args, dtype, load_kwargs: dict | None = None) -> torch.nn.Module:
    """A plain CausalLM (or Seq2SeqLM) from a directory or hub name (a seq-cls reward model loads its body as a
    CausalLM). `load_kwargs`: `quantization_config` / `device_map` for `from_pretrained`."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    cache_dir = getattr(model_args, "cache_dir", None)
    config_path = locate_file(name, "config.json", cache_dir)
    if os.path.isdir(name) and config_path is None:
        present = ", ".join(sorted(os.listdir(name))) or "nothing"
        raise CheckpointError(
            f"`model_name_or_path: {name}` is not a model checkpoint: config.json is missing (the directory holds "
            f"{present})."
        )
    config_json = read_json(config_path) if config_path is not None else {}
    # Vision-language / audio-language configs are not in AutoModelForCausalLM's mapping.
    auto_class = multimodal_auto_class(config_json) or (
        AutoModelForSeq2SeqLM if is_seq2seq_config(config_json) else AutoModelForCausalLM
    )
    if config_path is not None and is_sequence_classification(config_json):
        logger.warning(
            "%s is a sequence-classification reward model: its body is loaded as a causal LM whose LM head is "
            "absent and randomly initialised (unused for scoring); `score` becomes the value head.",
            name,
        )

    kwargs: dict[str, Any] = {"dtype": dtype, "cache_dir": cache_dir, **(load_kwargs or {})}
    if model_args.trust_remote_code:
        kwargs["trust_remote_code"] = True

    def load(impl: str | None):
        extra = {"attn_implementation": impl} if impl is not None else {}
        # Weights missing from the file (an LM head of a seq-cls model) are initialised at random; doing it
        # under a forked RNG keeps the run's random stream independent of what the checkpoint held.
        with torch.random.fork_rng(devices=[]):
            return auto_class.from_pretrained(name, **kwargs, **extra)

    try:
        model = _with_attn_fallback(load, model_args.attn_implementation)
    except (OSError, RuntimeError) as e:
        raise CheckpointError(
            f"Could not load the model `model_name_or_path: {name}`: {_one_line(e)}"
            + ("" if os.path.isdir(name) else " (no network here: a hub name must already be in the local cache).")
        ) from None
    except ValueError as e:
        raise CheckpointError(f"Could not load the model `model_name_or_path: {name}`: {_one_line(e)}") from None
    except Exception as e:  # safetensors raises its own error type for a truncated file
        if type(e).__name__ == "SafetensorError":
            raise CheckpointError(
                f"The weights of `model_name_or_path: {name}` could not be read ({_one_line(e)}); the file is corrupt."
            ) from None
        raise
    if os.path.isdir(name):
        model.name_or_path = os.path.abspath(name)
    return model


def _load_backbone(
    name: str, tokenizer, model_args, finetuning_args, dtype, is_trainable: bool, depth: int = 0,
    load_kwargs: dict | None = None,
):  # fmt: skip
    """The backbone for `name`: CausalLM, or PeftModel when `name` is a LoRA checkpoint kept as an adapter."""
    if depth > 4:
        raise CheckpointError(f"Adapter checkpoints nest too deeply at {name!r} (an adapter whose base is itself).")
    arch = builtin_arch(name)
    if arch is not None:
        return _build_builtin(arch, tokenizer, model_args, dtype, load_kwargs)
    _check_exists(name)
    cache_dir = getattr(model_args, "cache_dir", None)
    base_name = _adapter_base(name, cache_dir)
    if base_name is None:
        return _from_pretrained(name, model_args, dtype, load_kwargs)

    from peft import PeftModel

    base = _load_backbone(base_name, tokenizer, model_args, finetuning_args, dtype, False, depth + 1, load_kwargs)
    if isinstance(base, PeftModel) and is_quantized(base.get_base_model()):
        raise CheckpointError(
            f"{name!r} is an adapter on another adapter; with `quantization_bit` the inner one "
            "cannot be merged into the quantised base. Merge it first, or drop `quantization_bit`."
        )
    if isinstance(base, PeftModel):
        base = base.merge_and_unload()
    keep_adapter = not is_trainable or finetuning_args.finetuning_type == "lora"
    try:
        with torch.random.fork_rng(devices=[]):
            model = PeftModel.from_pretrained(base, name, is_trainable=is_trainable and keep_adapter)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise CheckpointError(f"Could not load the LoRA adapter in {name!r}: {_one_line(e)}") from None
    if not keep_adapter:
        logger.info("Merging the LoRA adapter of %s into its base for full fine-tuning.", name)
        return model.merge_and_unload().requires_grad_(True)
    return model


# ---- the model -----------------------------------------------------------------------------------


def _checkpoint_chain(name: str, cache_dir: str | None) -> list[str]:
    """`name`, then the base of its adapter, and so on: where a multimodal model's processor files may be."""
    chain = [name]
    while len(chain) < 5 and builtin_arch(chain[-1]) is None:
        base = _adapter_base(chain[-1], cache_dir)
        if base is None:
            break
        chain.append(base)
    return chain


def load_model_with_heads(
    model_args,
    finetuning_args,
    *,
    add_value_head: bool,
    is_trainable: bool = True,
    torch_dtype: Any = None,
):
    """Load (or build) the backbone, apply LoRA, create the heads and fill them from the checkpoint.

    Args:
        model_args: `ModelArguments` (model_name_or_path, trust_remote_code, attn_implementation, cache_dir).
        finetuning_args: `FinetuningArguments` (finetuning_type, lora_*, add_disco_head, add_beta_head,
            head_dropout, head_init_std, beta_head_epsilon).
        add_value_head: create the value (mean) head (stage rm, ppo critic).
        is_trainable: False freezes everything (reference or reward model) and adds no LoRA adapter.
        torch_dtype: backbone dtype; None means fp32. Heads are always fp32.
    Returns:
        (ModelWithHeads in eval mode, tokenizer).
    """
    name = os.path.expanduser(model_args.model_name_or_path)
    tokenizer = load_tokenizer(model_args)
    dtype = _resolve_dtype(torch_dtype)
    load_kwargs = _placement_kwargs(model_args, finetuning_args, dtype, is_trainable)
    backbone = _load_backbone(name, tokenizer, model_args, finetuning_args, dtype, is_trainable, 0, load_kwargs)

    from peft import PeftModel

    base_lm = backbone.get_base_model() if isinstance(backbone, PeftModel) else backbone
    if is_trainable and is_seq2seq_config(base_lm.config) and getattr(finetuning_args, "stage", "rm") != "rm":
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
        backbone = apply_lora(
            backbone,
            lora_rank=finetuning_args.lora_rank,
            lora_alpha=finetuning_args.lora_alpha,
            lora_dropout=finetuning_args.lora_dropout,
            lora_target=finetuning_args.lora_target,
            frozen_parts=trainable_parts(backbone, finetuning_args),  # None for text models
        )
    elif lora and is_trainable:
        logger.info("Continuing to train the LoRA adapter loaded from %s.", name)
    elif is_trainable and not isinstance(backbone, PeftModel):
        freeze_frozen_parts(backbone, finetuning_args)  # a multimodal model's towers; no-op for text models

    causal_lm = backbone.get_base_model() if isinstance(backbone, PeftModel) else backbone
    hidden_size = causal_lm.config.get_text_config().hidden_size
    quantized = is_quantized(causal_lm)
    heads_config = {
        "hidden_size": hidden_size,
        "head_dropout": finetuning_args.head_dropout,
        "head_init_std": finetuning_args.head_init_std,
        "beta_head_epsilon": finetuning_args.beta_head_epsilon,
        "beta_head_pooling": getattr(finetuning_args, "beta_head_pooling", "last"),
        "base_model_name_or_path": getattr(causal_lm, "name_or_path", None) or name,
        "finetuning_type": "lora" if isinstance(backbone, PeftModel) else "full",
    }
    ft = finetuning_args
    try:
        # Order matters for reproducibility: only the value head draws random numbers (after LoRA's init).
        value_head = ValueHead(hidden_size, ft.head_dropout, ft.head_init_std) if add_value_head else None
        variance_head = VarianceHead(hidden_size, ft.head_dropout) if ft.add_disco_head else None
        # PPO's beta head is a KL controller with a target, which fixes its level; in DPO only the centred head
        # is identifiable (docs/dynamic_beta.md).
        centered = ft.stage != "ppo"
        beta_head = BetaHead(hidden_size, ft.beta_head_epsilon, centered=centered) if ft.add_beta_head else None
    except ValueError as e:  # e.g. beta_head_epsilon outside (0, 1)
        raise ConfigError(f"Bad head setting: {e}.") from None
    modality = detect_modality(causal_lm.config)
    model = ModelWithHeads(backbone, value_head, variance_head, beta_head, heads_config, modality=modality)
    if modality != ActorModality.LANGUAGE_ONLY:
        model.media_processor = build_media_processor(
            causal_lm,
            tokenizer,
            model_args,
            sources=_checkpoint_chain(name, getattr(model_args, "cache_dir", None)),
            supported=model.supported_parameters,
        )

    if builtin_arch(name) is None:
        checkpoint_config = read_heads_config(name, getattr(model_args, "cache_dir", None)) or {}
        saved_eps = checkpoint_config.get("beta_head_epsilon")
        if beta_head is not None and checkpoint_config.get("beta_head") and saved_eps != beta_head.epsilon:
            logger.warning(
                "The beta head in %s was trained with beta_head_epsilon=%s; this run uses %s.",
                name,
                saved_eps,
                beta_head.epsilon,
            )
        load_heads(model, name, getattr(model_args, "cache_dir", None))

    device_map = getattr(causal_lm, "hf_device_map", None)
    if device_map and "device_map" in load_kwargs:
        # `auto` decides the placement while loading; one that offloads to CPU or disk is refused here.
        check_no_offload({str(d) for d in device_map.values()})
    if quantized or "device_map" in load_kwargs:  # (transformers sets `hf_device_map` only for split models)
        model.place_heads_on_hidden_device()  # heads are fp32 and trainable; on the device of the last hidden state
    if not is_trainable:
        model.requires_grad_(False)
    return model.eval(), tokenizer


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
