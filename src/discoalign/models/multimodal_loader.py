"""Loading the multimodal side of a model: its auto class, its media processor, which parts train.

`loader.load_model_with_heads` calls these for vision-language and audio-language models (a text model never
reaches them): the backbone loads through `AutoModelForImageTextToText` (vision) or `AutoModelForMultimodalLM`
(audio, omni) because `AutoModelForCausalLM` does not map those configs; heads read the language model's
last hidden state like a text model's; towers and projector stay frozen unless the config unfreezes them.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from ..config.builtin_models import TINY_MULTIMODAL_ARCHS
from ..data.media_processor import MediaProcessor, MediaTokens
from ..errors import CheckpointError, ConfigError
from .modality import ActorModality, detect_modality
from .multimodal_parts import freeze_parts, frozen_prefixes, multimodal_parts
from .tiny_multimodal import build_tiny_media_processor_parts

logger = logging.getLogger(__name__)


def multimodal_auto_class(config: Any):
    """The transformers auto class for a multimodal config (a `PreTrainedConfig` or config.json dict); None
    for a language-only model (which loads through `AutoModelForCausalLM`)."""
    modality = detect_modality(config)
    if modality == ActorModality.LANGUAGE_ONLY:
        return None
    if modality == ActorModality.OMNI:
        model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
        raise ConfigError(
            f"`model_name_or_path` is an omni (vision + audio) model (model_type {model_type!r}); discoalign trains "
            "vision-language (Qwen2-VL, Qwen2.5-VL) and audio-language (Qwen2-Audio) models so far."
        )
    from transformers import AutoModelForImageTextToText, AutoModelForMultimodalLM

    return AutoModelForImageTextToText if modality == ActorModality.VISION_LANGUAGE else AutoModelForMultimodalLM


def trainable_parts(causal_lm: nn.Module, finetuning_args) -> dict[str, bool] | None:
    """{tower / projector prefix: frozen?} of a multimodal model (see `multimodal_parts`); None for text models."""
    parts = multimodal_parts(causal_lm)
    return frozen_prefixes(parts, finetuning_args) if parts is not None else None


def freeze_frozen_parts(causal_lm: nn.Module, finetuning_args) -> None:
    """Full fine-tuning of a multimodal model: stop the gradients of its frozen towers / projector."""
    flags = trainable_parts(causal_lm, finetuning_args)
    if flags:
        frozen = freeze_parts(causal_lm, flags)
        if frozen:
            logger.info("Frozen multimodal parts (full fine-tuning): %s.", ", ".join(frozen))


def _token(tokenizer, token_id: int | None) -> str | None:
    if token_id is None:
        return None
    token = tokenizer.convert_ids_to_tokens(int(token_id))
    return token if isinstance(token, str) else None


def _token_if_known(tokenizer, token: str) -> str | None:
    token_id = tokenizer.convert_tokens_to_ids(token)
    return token if token_id is not None and token_id != tokenizer.unk_token_id else None


def media_tokens(config: Any, tokenizer):
    """The placeholder token strings a multimodal config names (ids from the config, strings from the tokenizer)."""

    def config_id(*names: str) -> int | None:
        return next((getattr(config, n) for n in names if getattr(config, n, None) is not None), None)

    modality = detect_modality(config)
    vision = modality in (ActorModality.VISION_LANGUAGE, ActorModality.OMNI)
    audio = modality in (ActorModality.AUDIO_LANGUAGE, ActorModality.OMNI)
    return MediaTokens(
        image=_token(tokenizer, config_id("image_token_id", "image_token_index")) if vision else None,
        image_start=_token(tokenizer, config_id("vision_start_token_id")) if vision else None,
        image_end=_token(tokenizer, config_id("vision_end_token_id")) if vision else None,
        video=_token(tokenizer, config_id("video_token_id", "video_token_index")) if vision else None,
        audio=_token(tokenizer, config_id("audio_token_id", "audio_token_index")) if audio else None,
        audio_start=_token_if_known(tokenizer, "<|audio_bos|>") if audio else None,
        audio_end=_token_if_known(tokenizer, "<|audio_eos|>") if audio else None,
    )


def _load_parts(source: str, modality: ActorModality, model_args) -> tuple[Any, Any]:
    """(image processor, feature extractor) saved in `source`; raises OSError / ValueError when absent."""
    from transformers import AutoFeatureExtractor, AutoImageProcessor

    kwargs: dict[str, Any] = {"cache_dir": model_args.cache_dir}
    if model_args.trust_remote_code:
        kwargs["trust_remote_code"] = True
    image_processor = feature_extractor = None
    if modality in (ActorModality.VISION_LANGUAGE, ActorModality.OMNI):
        image_processor = AutoImageProcessor.from_pretrained(source, **kwargs)
    if modality in (ActorModality.AUDIO_LANGUAGE, ActorModality.OMNI):
        feature_extractor = AutoFeatureExtractor.from_pretrained(source, **kwargs)
    return image_processor, feature_extractor


def build_media_processor(
    causal_lm: nn.Module,
    tokenizer,
    model_args,
    sources: list[str],
    supported: tuple[str, ...],
):
    """The `MediaProcessor` of a multimodal model, or None for a text model.

    Args:
        causal_lm: the loaded backbone (its config names the media token ids).
        tokenizer: the model's tokenizer.
        model_args: `ModelArguments` (image_max_pixels / image_min_pixels, cache_dir, trust_remote_code).
        sources: where to look for the image processor / feature extractor, in order (the checkpoint, then the
            base model of an adapter checkpoint); a `builtin:tiny-<arch>` source builds the tiny one.
        supported: the model's `supported_parameters`.
    """

    modality = detect_modality(causal_lm.config)
    if modality == ActorModality.LANGUAGE_ONLY:
        return None

    parts: tuple[Any, Any] | None = None
    errors = []
    for source in sources:
        tiny_arch = source.removeprefix("builtin:tiny-")
        if tiny_arch in TINY_MULTIMODAL_ARCHS:
            built = build_tiny_media_processor_parts(tiny_arch)
            parts = (None, built) if modality == ActorModality.AUDIO_LANGUAGE else (built, None)
            break
        try:
            parts = _load_parts(source, modality, model_args)
            break
        except (OSError, ValueError, KeyError) as e:
            errors.append(f"{source!r}: {' '.join(str(e).split())[:200]}")
    if parts is None:
        what = "feature extractor" if modality == ActorModality.AUDIO_LANGUAGE else "image processor"
        raise CheckpointError(
            f"`model_name_or_path: {model_args.model_name_or_path}` is a {modality.value.replace('_', '-')} model, but "
            f"its {what} (preprocessor_config.json) could not be loaded from {'; '.join(errors) or 'anywhere'}. Copy "
            "the base model's preprocessor_config.json into the checkpoint directory."
        )
    image_processor, feature_extractor = parts
    tokens = media_tokens(causal_lm.config, tokenizer)
    try:
        return MediaProcessor(
            tokenizer,
            tokens,
            supported,
            image_processor=image_processor,
            feature_extractor=feature_extractor,
            image_max_pixels=model_args.image_max_pixels,
            image_min_pixels=model_args.image_min_pixels,
        )
    except ValueError as e:
        raise CheckpointError(
            f"The tokenizer of `model_name_or_path: {model_args.model_name_or_path}` does not match its multimodal "
            f"config: {e}."
        ) from None
