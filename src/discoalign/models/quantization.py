"""Quantised bases (QLoRA) through bitsandbytes, and placement of inference-only models with `device_map`.

Keys (LlamaFactory's names): `quantization_bit: 4 | 8`, `quantization_type: nf4 | fp4`, `double_quantization`.
The base's linear layers become bitsandbytes `Linear4bit` / `Linear8bitLt`; LoRA adapters and the heads stay fp32
and trainable. Everything is checked from the config alone, before any model loads (`check_quantization`).
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from ..errors import ConfigError

QUANTIZATION_BITS = (4, 8)
OFFLOAD_DEVICES = ("cpu", "disk", "meta")
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def bitsandbytes_available() -> bool:
    """True when the `bitsandbytes` package can be imported (the `qlora` extra)."""
    return importlib.util.find_spec("bitsandbytes") is not None


def check_quantization(model_args, ft) -> None:
    """ConfigError for a quantisation setting that cannot work; called before any model loads."""
    bits = getattr(model_args, "quantization_bit", None)
    if bits is None:
        return
    if bits not in QUANTIZATION_BITS:
        raise ConfigError(f"`quantization_bit` is {bits}; it must be 4 or 8 (or unset for an unquantised base).")
    if ft.finetuning_type != "lora":
        raise ConfigError(
            f"`quantization_bit: {bits}` needs `finetuning_type: lora` (QLoRA): the weights of a quantised base "
            f"cannot be trained, only LoRA adapters on top of it. Set `finetuning_type: lora` or drop "
            "`quantization_bit`."
        )
    if not bitsandbytes_available():
        raise ConfigError(
            f"`quantization_bit: {bits}` needs the `bitsandbytes` package, which is not installed. Install it "
            '(`pip install -c constraints.txt -e ".[qlora]"`) or drop `quantization_bit`.'
        )


def bnb_config(model_args, compute_dtype: Any) -> Any | None:
    """The `transformers.BitsAndBytesConfig` for `model_args`, or None when `quantization_bit` is unset.

    4-bit layers compute in `compute_dtype` (the run's dtype; fp32 when unset, since heads read the hidden state
    in fp32 anyway). The LM head stays unquantised (transformers skips the output embedding).
    """
    bits = getattr(model_args, "quantization_bit", None)
    if bits is None:
        return None
    from transformers import BitsAndBytesConfig

    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=model_args.quantization_type,
        bnb_4bit_use_double_quant=bool(model_args.double_quantization),
        bnb_4bit_compute_dtype=compute_dtype if isinstance(compute_dtype, torch.dtype) else torch.float32,
        bnb_4bit_quant_storage=torch.uint8,
    )


def is_quantized(module: torch.nn.Module) -> bool:
    """True when `module` (a transformers model) was loaded through bitsandbytes."""
    return bool(getattr(module, "is_quantized", False) or getattr(module, "is_loaded_in_4bit", False)
                or getattr(module, "is_loaded_in_8bit", False))  # fmt: skip


def prepare_for_kbit_training(model: torch.nn.Module) -> torch.nn.Module:
    """PEFT's `prepare_model_for_kbit_training` without turning on activation checkpointing (a separate key).

    Freezes the quantised base and casts its remaining float weights (norms, embeddings) to fp32 for stable
    training, as QLoRA does; adapters added afterwards are the only trainable backbone weights.
    """
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    for module in model.modules():
        # On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight the first time it runs in eval mode without
        # grad (a PPO rollout, a reference pass) and from then on uses a kernel with no backward: the gradients of
        # every adapter below it would be silently wrong. A model that trains keeps the trainable layout.
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


# ---- device_map ----------------------------------------------------------------------------------


def parse_device_map(value: Any, key: str = "device_map") -> Any:
    """`device_map` from the YAML -> what `from_pretrained` takes; ConfigError for a value that offloads.

    Accepted: a strategy (`auto`, `balanced`, `balanced_low_0`, `sequential`), one device (`cpu`, `cuda:1`, an
    integer GPU index) or a dict {module name: device}. A dict that sends modules to `disk`, or to `cpu` next to
    accelerator devices, is CPU/disk offload: the heads read the last hidden state on one device, and offloaded
    weights move at every forward pass, so it is refused here, before the model loads.
    """
    if value is None:
        return None
    if isinstance(value, dict):
        devices = {str(v) for v in value.values()}
        check_no_offload(devices, key)
        return value
    if isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
        return {"": int(value)}
    text = str(value).strip()
    if text in DEVICE_MAP_STRATEGIES:
        return text
    if text == "disk":
        check_no_offload({"disk"}, key)
    try:
        torch.device(text)
    except (RuntimeError, ValueError):
        raise ConfigError(
            f"`{key}: {value}` is neither a placement strategy ({', '.join(DEVICE_MAP_STRATEGIES)}) nor a device "
            "(`cpu`, `cuda:0`, ...)."
        ) from None
    return {"": text}


def check_no_offload(devices: set[str], key: str = "device_map") -> None:
    """ConfigError when a device map's `devices` mean CPU or disk offload (see `parse_device_map`)."""
    names = {d.split(":")[0] for d in devices}
    offloads = "disk" in names or "meta" in names or ("cpu" in names and len(names - {"cpu"}) > 0)
    if offloads:
        offloaded = ", ".join(sorted(names & set(OFFLOAD_DEVICES)))
        others = ", ".join(sorted(names - set(OFFLOAD_DEVICES)))
        where = f"part of the model on {offloaded} next to {others}" if others else f"the model on {offloaded}"
        raise ConfigError(
            f"`{key}` places {where}: CPU/disk offload is not supported "
            "for models with heads (the value head reads the last hidden state, and offloaded weights would move "
            "at every forward pass). Use GPUs only (`device_map: auto` with enough GPU memory, or fewer layers "
            "per GPU via a dict), or a smaller dtype / `quantization_bit`."
        )


def last_hidden_device(decoder: torch.nn.Module) -> torch.device:
    """Device of the decoder body's output (its last hidden state): where its final norm's weights live.

    The final norm (`norm`, `ln_f`, `final_layer_norm`) is the last parameter registered in every body we load.
    """
    params = list(decoder.parameters())
    last = params[-1] if params else None
    if last is None:
        raise ValueError("the decoder has no parameters")
    return last.device
