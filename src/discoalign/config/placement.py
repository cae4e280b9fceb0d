"""The rules for `quantization_bit` / `quantization_type` (QLoRA) and `device_map`, checked from the config alone,
before any model loads (`config.validate`), and again by the model loader (`models/quantization.py`, `models/loader.py`)."""

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
