"""The backbone of a model: resolving `model_name_or_path` (built-in, directory, adapter, hub name) and loading the
transformers model itself, with the attention-implementation fallback, quantisation and device placement.

`models.loader` builds the tokenizer and puts the heads on top (`load_model_with_heads`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from typing import Any

import torch

from ..config.builtin_models import TINY_ARCHS, TINY_MULTIMODAL_ARCHS, TINY_SEQ2SEQ_ARCHS
from ..errors import CheckpointError, ConfigError
from .checkpoint import ADAPTER_CONFIG_NAME, read_heads_config
from .gguf import load_gguf_causal_lm
from .interop import is_sequence_classification
from .multimodal_loader import multimodal_auto_class
from .quantization import (
    is_quantized,
)
from .seq2seq import is_seq2seq_config
from .tiny import build_tiny_model, write_tiny_model
from .tiny_multimodal import build_tiny_multimodal_model
from .vocabulary import fit_embeddings
from .weight_files import locate_file, read_json

logger = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:tiny-"
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


def check_model_path(name: str, key: str = "model_name_or_path") -> None:
    """A name that is clearly a path must be an existing directory (a hub id is `org/name`)."""
    if os.path.isfile(name):
        raise CheckpointError(f"`{key}: {name}` is a file; it must be a model directory (or a hub name).")
    if _looks_like_path(name) and not os.path.isdir(name):
        raise CheckpointError(f"`{key}: {name}`: the directory does not exist.")


def adapter_base(name: str, cache_dir: str | None) -> str | None:
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


# ---- backbone ------------------------------------------------------------------------------------


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def resolve_dtype(torch_dtype: Any) -> Any:
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
            message = one_line(e)
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
            else:  # the built-in tokenizer's sizes: the same weights whatever `template` added (`fit_embeddings`)
                model = build_tiny_model(arch, seed=0)
                for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
                    setattr(model.generation_config, key, getattr(tokenizer, key))
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

    if getattr(model_args, "gguf_file", None):
        return _from_gguf(name, model_args, dtype, load_kwargs)
    cache_dir = getattr(model_args, "cache_dir", None)
    config_path = locate_file(name, "config.json", cache_dir)
    if os.path.isdir(name) and config_path is None:
        present = ", ".join(sorted(os.listdir(name))) or "nothing"
        hint = " For a GGUF file, set `gguf_file:` to its name." if ".gguf" in present else ""
        raise CheckpointError(
            f"`model_name_or_path: {name}` is not a model checkpoint: config.json is missing (the directory holds "
            f"{present}).{hint}"
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
            f"Could not load the model `model_name_or_path: {name}`: {one_line(e)}"
            + ("" if os.path.isdir(name) else " (no network here: a hub name must already be in the local cache).")
        ) from None
    except ValueError as e:
        raise CheckpointError(f"Could not load the model `model_name_or_path: {name}`: {one_line(e)}") from None
    except Exception as e:  # safetensors raises its own error type for a truncated file
        if type(e).__name__ == "SafetensorError":
            raise CheckpointError(
                f"The weights of `model_name_or_path: {name}` could not be read ({one_line(e)}); the file is corrupt."
            ) from None
        raise
    if os.path.isdir(name):
        model.name_or_path = os.path.abspath(name)
    return model


def _from_gguf(name: str, model_args, dtype, load_kwargs: dict | None) -> torch.nn.Module:
    """`gguf_file` of the folder `name`, de-quantised into a plain model (`models.gguf`; the log says so)."""
    if load_kwargs:
        raise ConfigError(
            f"`gguf_file: {model_args.gguf_file}` cannot be combined with `quantization_bit` or `device_map`: the GGUF "
            "weights are de-quantised to a plain model. Convert it once (`discoalign pull`, or load and save it), "
            "then use the saved folder with those keys."
        )
    if dtype == "auto":
        dtype = torch.float32

    def load(impl: str | None):
        return load_gguf_causal_lm(name, model_args.gguf_file, dtype, **({"attn_implementation": impl} if impl else {}))

    return _with_attn_fallback(load, model_args.attn_implementation)


def load_backbone(
    name: str, tokenizer, model_args, finetuning_args, dtype, is_trainable: bool, depth: int = 0,
    load_kwargs: dict | None = None,
):  # fmt: skip
    """The backbone for `name`: CausalLM, or PeftModel when `name` is a LoRA checkpoint kept as an adapter."""
    if depth > 4:
        raise CheckpointError(f"Adapter checkpoints nest too deeply at {name!r} (an adapter whose base is itself).")
    arch = builtin_arch(name)
    if arch is not None:
        model = _build_builtin(arch, tokenizer, model_args, dtype, load_kwargs)
        fit_embeddings(model, tokenizer)
        return model
    check_model_path(name)
    cache_dir = getattr(model_args, "cache_dir", None)
    base_name = adapter_base(name, cache_dir)
    if base_name is None:
        model = _from_pretrained(name, model_args, dtype, load_kwargs)
        fit_embeddings(model, tokenizer)
        return model

    from peft import PeftModel

    base = load_backbone(base_name, tokenizer, model_args, finetuning_args, dtype, False, depth + 1, load_kwargs)
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
        raise CheckpointError(f"Could not load the LoRA adapter in {name!r}: {one_line(e)}") from None
    if not keep_adapter:
        logger.info("Merging the LoRA adapter of %s into its base for full fine-tuning.", name)
        return model.merge_and_unload().requires_grad_(True)
    return model


def split_adapters(value: str | None) -> list[str]:
    """`adapter_name_or_path: a, b` -> ["a", "b"] (user paths expanded)."""
    return [os.path.expanduser(part.strip()) for part in (value or "").split(",") if part.strip()]


def attach_adapters(backbone, adapters: list[str], finetuning_args, is_trainable: bool):
    """`adapter_name_or_path` (LlamaFactory's rule): every adapter but the last is merged into the base; the last is
    kept as the adapter to train further (`finetuning_type: lora` without `create_new_adapter`) or to run with
    (an inference-only model), else merged too (`full` fine-tuning; `create_new_adapter`, which then gets a fresh
    adapter from `models.lora`)."""
    from peft import PeftModel

    if isinstance(backbone, PeftModel):
        backbone = backbone.merge_and_unload()
    lora = finetuning_args.finetuning_type == "lora"
    resume = not is_trainable or (lora and not finetuning_args.create_new_adapter)
    for index, path in enumerate(adapters):
        if not os.path.isfile(os.path.join(path, ADAPTER_CONFIG_NAME)):
            raise CheckpointError(f"`adapter_name_or_path: {path}` is not a LoRA adapter folder (it has no "
                                  f"{ADAPTER_CONFIG_NAME}).")  # fmt: skip
        last = index == len(adapters) - 1
        try:
            with torch.random.fork_rng(devices=[]):
                model = PeftModel.from_pretrained(backbone, path, is_trainable=is_trainable and last and resume)
        except (OSError, ValueError, RuntimeError, KeyError) as e:
            raise CheckpointError(f"Could not load the LoRA adapter `adapter_name_or_path: {path}` onto the model: "
                                  f"{one_line(e)}") from None  # fmt: skip
        if last and resume:
            logger.info("Loaded the adapter %s%s.", path, " to train further" if is_trainable else "")
            return model
        backbone = model.merge_and_unload()
        logger.info("Merged the adapter %s into the model.", path)
    return backbone.requires_grad_(is_trainable)
