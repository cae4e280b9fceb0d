"""What kind of input an actor model takes, and the extra forward arguments each kind accepts (docs/design.md §7).

Trainers and collators ask the model (`ModelWithHeads.supported_parameters`) which extra arguments to pass
on, instead of hard-coding `pixel_values` and friends: a model gets exactly the media inputs its forward names.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from enum import Enum
from typing import Any

from torch import nn


class ActorModality(str, Enum):
    LANGUAGE_ONLY = "language_only"
    VISION_LANGUAGE = "vision_language"
    AUDIO_LANGUAGE = "audio_language"
    OMNI = "omni"


_VISION_INPUTS = (
    "pixel_values",
    "image_grid_thw",
    "image_sizes",
    "mm_token_type_ids",  # text 0, image 1, video 2: Qwen2-VL's M-RoPE needs it (transformers >= 5)
    "pixel_values_videos",
    "video_grid_thw",
    "second_per_grid_ts",
)
_AUDIO_INPUTS = ("audio_values", "input_features", "feature_attention_mask")

# Beyond input_ids / attention_mask (which every modality takes).
MODALITY_INPUTS: dict[ActorModality, tuple[str, ...]] = {
    ActorModality.LANGUAGE_ONLY: (),
    ActorModality.VISION_LANGUAGE: _VISION_INPUTS,
    ActorModality.AUDIO_LANGUAGE: _AUDIO_INPUTS,
    ActorModality.OMNI: _VISION_INPUTS + _AUDIO_INPUTS,
}

# Every media input any modality may carry; a batch key in this set is a model input, not a label or a margin.
MEDIA_INPUT_NAMES: frozenset[str] = frozenset(MODALITY_INPUTS[ActorModality.OMNI])

# Composite configs name their towers' sub-configs; an omni model nests them under a "thinker".
_VISION_CONFIG_KEYS = ("vision_config",)
_AUDIO_CONFIG_KEYS = ("audio_config",)
_OMNI_CONFIG_KEYS = ("thinker_config",)


def _has(config: Any, key: str) -> bool:
    value = config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)
    return value is not None


def detect_modality(config: Any) -> ActorModality:
    """The modality of a model from its config (a `PreTrainedConfig` or the dict of a `config.json`).

    A `vision_config` means vision-language, an `audio_config` audio-language, both (or a `thinker_config`)
    omni; anything else is a language-only causal LM.
    """
    vision = any(_has(config, k) for k in _VISION_CONFIG_KEYS)
    audio = any(_has(config, k) for k in _AUDIO_CONFIG_KEYS)
    if (vision and audio) or any(_has(config, k) for k in _OMNI_CONFIG_KEYS):
        return ActorModality.OMNI
    if vision:
        return ActorModality.VISION_LANGUAGE
    if audio:
        return ActorModality.AUDIO_LANGUAGE
    return ActorModality.LANGUAGE_ONLY


def supported_parameters(module: nn.Module, modality: ActorModality) -> tuple[str, ...]:
    """The media inputs of `modality` that `module.forward` names, in MODALITY_INPUTS order.

    E.g. Qwen2-VL -> (pixel_values, image_grid_thw, mm_token_type_ids, pixel_values_videos, video_grid_thw);
    Qwen2-Audio -> (input_features, feature_attention_mask); a text model -> ().
    """
    candidates = MODALITY_INPUTS[modality]
    if not candidates:
        return ()
    names = set(inspect.signature(module.forward).parameters)
    return tuple(name for name in candidates if name in names)


def select_model_inputs(batch: Mapping[str, Any], supported: tuple[str, ...]) -> dict[str, Any]:
    """The entries of a collated batch that are media inputs the model takes (absent or None ones dropped)."""
    return {name: batch[name] for name in supported if batch.get(name) is not None}
