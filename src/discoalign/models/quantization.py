"""Quantised bases (QLoRA) through bitsandbytes, and placement of inference-only models with `device_map`.

Keys (LlamaFactory's names): `quantization_bit: 4 | 8`, `quantization_type: nf4 | fp4`, `double_quantization`.
The base's linear layers become bitsandbytes `Linear4bit` / `Linear8bitLt`; LoRA adapters and the heads stay fp32
and trainable. Everything is checked from the config alone, before any model loads (`config/placement.py`).
"""

from __future__ import annotations

from typing import Any

import torch


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


def last_hidden_device(decoder: torch.nn.Module) -> torch.device:
    """Device of the decoder body's output (its last hidden state): where its final norm's weights live.

    The final norm (`norm`, `ln_f`, `final_layer_norm`) is the last parameter registered in every body we load.
    """
    params = list(decoder.parameters())
    last = params[-1] if params else None
    if last is None:
        raise ValueError("the decoder has no parameters")
    return last.device
