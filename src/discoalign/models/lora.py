"""LoRA (`finetuning_type: lora`): target detection and wrapping the backbone as a PEFT model.

`lora_target: all` means every linear layer of the backbone except the output embedding (LM head),
found by walking the modules; GPT-2's `Conv1D` is a linear layer with transposed weights and counts too.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..errors import ConfigError
from .multimodal_parts import exclusion_pattern, is_frozen, linear_types


def find_linear_targets(causal_lm: nn.Module, keep: Callable[[str], bool] | None = None) -> list[str]:
    """Sorted short names (last path component) of every linear layer except the output embedding.

    E.g. Llama -> ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"].
    `keep(full_name)`, when given, limits the search (a multimodal model's language model and unfrozen parts).
    """
    output_embedding = causal_lm.get_output_embeddings()
    names = set()
    for full_name, module in causal_lm.named_modules():
        if module is output_embedding or not isinstance(module, linear_types()):
            continue
        if keep is not None and not keep(full_name):
            continue
        names.add(full_name.rsplit(".", 1)[-1])
    return sorted(names)


def _output_embedding_name(causal_lm: nn.Module) -> str | None:
    output_embedding = causal_lm.get_output_embeddings()
    for full_name, module in causal_lm.named_modules():
        if module is output_embedding:
            return full_name
    return None


def resolve_lora_targets(
    causal_lm: nn.Module, lora_target: str, keep: Callable[[str], bool] | None = None
) -> list[str]:
    """`lora_target` ("all" or "q_proj, v_proj") -> the list of module short names; ConfigError if one is absent.

    `keep(full_name)` limits where targets are looked for (see `find_linear_targets`).
    """
    available = find_linear_targets(causal_lm, keep)
    if lora_target.strip().lower() == "all":
        if not available:
            raise ConfigError(
                "`lora_target: all` found no linear layer in the model to adapt; list the module names in "
                "`lora_target` explicitly (comma-separated)."
            )
        return available
    wanted = [name.strip() for name in lora_target.split(",") if name.strip()]
    module_names = {full.rsplit(".", 1)[-1] for full, _ in causal_lm.named_modules() if keep is None or keep(full)}
    missing = [name for name in wanted if name not in module_names]
    if not wanted or missing:
        raise ConfigError(
            f"`lora_target: {lora_target}` names module(s) {', '.join(map(repr, missing)) or '(none)'} that the "
            f"model does not have. Its linear layers are: {', '.join(available)} (or use `lora_target: all`)."
        )
    return wanted


def apply_lora(
    causal_lm: nn.Module,
    lora_rank: int,
    lora_alpha: int | None,
    lora_dropout: float,
    lora_target: str,
    frozen_parts: dict[str, bool] | None = None,
):
    """Wrap `causal_lm` in a fresh trainable LoRA adapter; returns the PeftModel.

    Only the adapter's parameters require grad afterwards. `lora_alpha` defaults to 2 * rank.
    `frozen_parts` ({module prefix: frozen?}, see `multimodal_parts.frozen_prefixes`) keeps adapters out of a
    multimodal model's frozen towers / projector; None (text models) adapts every matching linear layer.
    """
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers.pytorch_utils import Conv1D

    # lora_rank, lora_alpha and lora_dropout were checked by `config.validate` before any model loaded.
    keep = None
    if frozen_parts:
        keep = lambda name: not is_frozen(name, frozen_parts)  # noqa: E731
    targets = resolve_lora_targets(causal_lm, lora_target, keep)
    target_set = set(targets)
    uses_conv1d = any(
        isinstance(m, Conv1D) and name.rsplit(".", 1)[-1] in target_set for name, m in causal_lm.named_modules()
    )
    head_name = _output_embedding_name(causal_lm)
    exclude: list[str] | str | None = [head_name] if head_name else None
    if frozen_parts:
        exclude = exclusion_pattern(causal_lm, frozen_parts, targets)
    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=lora_rank,
        lora_alpha=lora_alpha if lora_alpha is not None else 2 * lora_rank,
        lora_dropout=lora_dropout,
        target_modules=targets,
        # A short name may also match the LM head (e.g. a model whose head is called like a projection).
        exclude_modules=exclude,
        fan_in_fan_out=uses_conv1d,
    )
    return get_peft_model(causal_lm, config)
