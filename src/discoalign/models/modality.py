"""What kind of input an actor model takes, and the extra forward arguments each kind accepts (DESIGN §7).

Trainers ask the model (`ModelWithHeads.accepted_model_inputs`) which extra arguments to pass on, instead of
hard-coding `pixel_values` and friends.
"""

from __future__ import annotations

from enum import Enum


class ActorModality(str, Enum):
    LANGUAGE_ONLY = "language_only"
    VISION_LANGUAGE = "vision_language"
    AUDIO_LANGUAGE = "audio_language"
    OMNI = "omni"


# Beyond input_ids / attention_mask (which every modality takes).
MODALITY_INPUTS: dict[ActorModality, tuple[str, ...]] = {
    ActorModality.LANGUAGE_ONLY: (),
    ActorModality.VISION_LANGUAGE: ("pixel_values", "image_grid_thw", "image_sizes"),
    ActorModality.AUDIO_LANGUAGE: ("audio_values", "input_features", "feature_attention_mask"),
    ActorModality.OMNI: (
        "pixel_values",
        "image_grid_thw",
        "image_sizes",
        "pixel_values_videos",
        "video_grid_thw",
        "audio_values",
        "input_features",
        "feature_attention_mask",
    ),
}
