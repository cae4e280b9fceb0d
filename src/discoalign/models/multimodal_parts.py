"""Where a multimodal model's language model, towers and projector live, and which of them train.

A vision-language or audio-language model is a language model plus an encoder tower (vision or audio) and a
projector that maps the tower's output into the language model's embedding space. By default only the
language model trains: towers and projector are frozen under full fine-tuning, and LoRA adapts only the
language model's linear layers (LlamaFactory's `freeze_vision_tower` / `freeze_multi_modal_projector`
semantics, plus `freeze_audio_tower`). Unfreezing a part makes its parameters train (full) or its linear
layers LoRA targets (lora).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from .modality import ActorModality, detect_modality


@dataclass(frozen=True)
class MultimodalParts:
    """Module paths (as in `causal_lm.named_modules()`) of each part of a multimodal model."""

    language_model: str
    vision_tower: tuple[str, ...] = ()
    audio_tower: tuple[str, ...] = ()
    projector: tuple[str, ...] = ()  # may sit inside a tower (Qwen2-VL's `visual.merger`); the most specific wins


# The LoRA target pattern per architecture: every linear layer under `language_model` (and under an unfrozen part).
KNOWN_PARTS: dict[str, MultimodalParts] = {
    "qwen2_vl": MultimodalParts(
        "model.language_model", vision_tower=("model.visual",), projector=("model.visual.merger",)
    ),
    "qwen2_5_vl": MultimodalParts(
        "model.language_model", vision_tower=("model.visual",), projector=("model.visual.merger",)
    ),
    "qwen2_audio": MultimodalParts(
        "model.language_model", audio_tower=("model.audio_tower",), projector=("model.multi_modal_projector",)
    ),
}

# Names other architectures give their parts; used when the model type is not in KNOWN_PARTS.
_VISION_NAMES = ("visual", "vision_tower", "vision_model", "vision_encoder")
_AUDIO_NAMES = ("audio_tower", "audio_model", "audio_encoder")
_PROJECTOR_NAMES = ("multi_modal_projector", "mm_projector", "audio_projector", "merger")


def linear_types() -> tuple[type, ...]:
    """The module types LoRA can wrap: `nn.Linear`, and GPT-2's `Conv1D`."""
    from transformers.pytorch_utils import Conv1D

    return (nn.Linear, Conv1D)


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _topmost(names: list[str]) -> tuple[str, ...]:
    """Drop names nested inside another name of the list."""
    return tuple(n for n in names if not any(n != other and _under(n, other) for other in names))


def multimodal_parts(causal_lm: nn.Module) -> MultimodalParts | None:
    """The parts of a multimodal model, or None for a language-only one.

    Known architectures use KNOWN_PARTS; others are found by module names (`visual`, `audio_tower`,
    `multi_modal_projector`, ...) and the language model is the module `get_decoder()` returns.
    """
    if detect_modality(causal_lm.config) == ActorModality.LANGUAGE_ONLY:
        return None
    names = dict(causal_lm.named_modules())
    known = KNOWN_PARTS.get(getattr(causal_lm.config, "model_type", ""))
    if known is not None and all(p in names for p in (known.language_model, *known.vision_tower, *known.audio_tower)):
        return known
    decoder = causal_lm.get_decoder()
    language_model = next((n for n, m in names.items() if m is decoder and n), "")

    def named(short_names: tuple[str, ...]) -> tuple[str, ...]:
        found = [n for n in names if n.rsplit(".", 1)[-1] in short_names and not _under(n, language_model)]
        return _topmost(found)

    return MultimodalParts(language_model, named(_VISION_NAMES), named(_AUDIO_NAMES), named(_PROJECTOR_NAMES))


def frozen_prefixes(parts: MultimodalParts, finetuning_args) -> dict[str, bool]:
    """{part prefix: frozen?} for every tower and projector prefix, from the `freeze_*` config keys."""
    flags: dict[str, bool] = {}
    for prefix in parts.vision_tower:
        flags[prefix] = finetuning_args.freeze_vision_tower
    for prefix in parts.audio_tower:
        flags[prefix] = finetuning_args.freeze_audio_tower
    for prefix in parts.projector:
        flags[prefix] = finetuning_args.freeze_multi_modal_projector
    return flags


def is_frozen(name: str, flags: dict[str, bool]) -> bool:
    """Whether module/parameter `name` lies in a frozen part; the longest (most specific) matching prefix decides."""
    matches = [p for p in flags if _under(name, p)]
    return flags[max(matches, key=len)] if matches else False


def exclusion_pattern(causal_lm: nn.Module, flags: dict[str, bool], targets: list[str]) -> str:
    """A `re.fullmatch` pattern (PEFT `exclude_modules`) for modules LoRA must leave alone.

    It covers the output embedding, each frozen part (except the unfrozen parts nested in it), and any module
    outside the frozen parts whose short name is a target but which is not a linear layer (e.g. a patch
    embedding convolution called `proj`).
    """
    alternatives = []
    head = next((n for n, m in causal_lm.named_modules() if m is causal_lm.get_output_embeddings()), None)
    if head:
        alternatives.append(re.escape(head))
    for prefix, frozen in flags.items():
        if not frozen:
            continue
        inner = [p for p, f in flags.items() if not f and p != prefix and _under(p, prefix)]
        lookahead = "".join(f"(?!{re.escape(p[len(prefix) :])}(?:\\.|$))" for p in inner)
        alternatives.append(f"{re.escape(prefix)}{lookahead}(?:\\..*)?")
    target_set = set(targets)
    for name, module in causal_lm.named_modules():
        if (
            name.rsplit(".", 1)[-1] in target_set
            and not isinstance(module, linear_types())
            and not is_frozen(name, flags)
        ):
            alternatives.append(re.escape(name))
    return "|".join(f"(?:{a})" for a in alternatives)


def freeze_parts(causal_lm: nn.Module, flags: dict[str, bool]) -> list[str]:
    """Full fine-tuning: stop gradients of every parameter in a frozen part. Returns the frozen part prefixes."""
    for name, param in causal_lm.named_parameters():
        if is_frozen(name, flags):
            param.requires_grad_(False)
    return [p for p, frozen in flags.items() if frozen]
