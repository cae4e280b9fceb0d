"""Tiny random vision-language and audio-language models, built offline (`builtin:tiny-qwen2-vl`, ...).

Each is the real transformers architecture (Qwen2-VL, Qwen2.5-VL, Qwen2-Audio) at toy size: the language
model is the text tiny model's shape (hidden 64, 2 layers), the vision tower takes 14-pixel patches merged
2 x 2 (a 28 x 28 image is one token), the audio tower reads 1-second Whisper windows of 16 mel bins. The
tokenizer is `tiny.build_tiny_tokenizer()` plus the model family's media special tokens; the image processor
is transformers' PIL one and the feature extractor Whisper's, so no torchvision / torchaudio is needed.

Deterministic: the same arch and seed give the same weights bit for bit; the global RNG is left untouched.
"""

from __future__ import annotations

from ..config.builtin_models import TINY_MULTIMODAL_ARCHS
from .tiny import (
    TINY_HIDDEN,
    build_tiny_tokenizer,
    save_model_and_tokenizer,
    seeded_from_config,
    tiny_decoder_kwargs,
)

VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
AUDIO_TOKENS = ("<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>")

# Vision: patch 14, merge 2 (Qwen's values), so a 28 x 28 image is 2 x 2 patches = 1 language token.
TINY_PATCH = 14
TINY_IMAGE_MIN_PIXELS = 28 * 28
TINY_IMAGE_MAX_PIXELS = 112 * 112  # at most 8 x 8 patches = 16 language tokens per image
# Audio: 16 kHz, hop 160 -> 100 mel frames per 1-second window -> 50 encoder positions -> at most 25 tokens.
TINY_SAMPLING_RATE = 16000
TINY_MEL_BINS = 16
TINY_AUDIO_SECONDS = 1


def _check_arch(arch: str) -> None:
    if arch not in TINY_MULTIMODAL_ARCHS:
        raise ValueError(f"unknown tiny multimodal arch {arch!r}; expected one of {', '.join(TINY_MULTIMODAL_ARCHS)}")


def media_tokens_of(arch: str) -> tuple[str, ...]:
    """The special tokens the arch's placeholders use (added to the tiny tokenizer)."""
    _check_arch(arch)
    return AUDIO_TOKENS if arch == "qwen2-audio" else VISION_TOKENS


def build_tiny_multimodal_tokenizer(arch: str):
    """The tiny text tokenizer with the arch's media special tokens appended (ids 1024, 1025, ...)."""
    tokenizer = build_tiny_tokenizer()
    tokenizer.add_special_tokens(
        {"additional_special_tokens": list(media_tokens_of(arch))}, replace_extra_special_tokens=False
    )
    return tokenizer


def _text_config(tokenizer) -> dict:
    return tiny_decoder_kwargs(len(tokenizer), tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)


def _tiny_config(arch: str, tokenizer):
    from transformers import Qwen2_5_VLConfig, Qwen2AudioConfig, Qwen2VLConfig

    ids = tokenizer.convert_tokens_to_ids
    text = _text_config(tokenizer)
    if arch == "qwen2-audio":
        return Qwen2AudioConfig(
            audio_config=dict(
                model_type="qwen2_audio_encoder",
                d_model=32,
                encoder_layers=1,
                encoder_attention_heads=2,
                encoder_ffn_dim=64,
                num_mel_bins=TINY_MEL_BINS,
                max_source_positions=TINY_SAMPLING_RATE * TINY_AUDIO_SECONDS // 160 // 2,
            ),
            text_config=dict(model_type="qwen2", **text),
            audio_token_index=ids("<|AUDIO|>"),
        )
    # M-RoPE splits each head's 8 rotary frequencies over (time, height, width).
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    media_ids = dict(
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    patches = dict(patch_size=TINY_PATCH, spatial_merge_size=2, temporal_patch_size=2, num_heads=2)
    if arch == "qwen2-vl":
        vision = dict(depth=1, embed_dim=32, hidden_size=TINY_HIDDEN, mlp_ratio=2, **patches)
        return Qwen2VLConfig(text_config=text, vision_config=vision, **media_ids)
    # Qwen2.5-VL: two blocks so both kinds run, windowed (block 0, 2 x 2 merged tokens per window) and full.
    vision = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        out_hidden_size=TINY_HIDDEN,
        window_size=56,
        fullatt_block_indexes=[1],
        **patches,
    )
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **media_ids)


def build_tiny_media_processor_parts(arch: str):
    """The HF image processor (PIL backend) or Whisper feature extractor of the tiny arch."""
    _check_arch(arch)
    if arch == "qwen2-audio":
        from transformers import WhisperFeatureExtractor

        return WhisperFeatureExtractor(
            feature_size=TINY_MEL_BINS,
            sampling_rate=TINY_SAMPLING_RATE,
            hop_length=160,
            chunk_length=TINY_AUDIO_SECONDS,
            n_fft=400,
        )
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(
        min_pixels=TINY_IMAGE_MIN_PIXELS, max_pixels=TINY_IMAGE_MAX_PIXELS, patch_size=TINY_PATCH, merge_size=2
    )


def build_tiny_multimodal_model(arch: str, tokenizer=None, seed: int = 0):
    """A randomly initialised tiny multimodal model (fp32, eval mode), loaded through the multimodal auto class.

    Args:
        arch: one of TINY_MULTIMODAL_ARCHS.
        tokenizer: sets vocab size, special ids and media token ids; defaults to the arch's tiny tokenizer.
        seed: the init seed (the global RNG is untouched).
    """
    from transformers import AutoModelForImageTextToText, AutoModelForMultimodalLM

    _check_arch(arch)
    tokenizer = tokenizer if tokenizer is not None else build_tiny_multimodal_tokenizer(arch)
    config = _tiny_config(arch, tokenizer)
    auto_class = AutoModelForMultimodalLM if arch == "qwen2-audio" else AutoModelForImageTextToText
    return seeded_from_config(auto_class, config, tokenizer, seed)


def write_tiny_multimodal_model(arch: str, out_dir: str, seed: int = 0) -> str:
    """Save a tiny multimodal model (safetensors), its tokenizer and image processor / feature extractor.

    The directory then loads offline through `model_name_or_path: <out_dir>` like a hub checkpoint.
    """
    tokenizer = build_tiny_multimodal_tokenizer(arch)
    model = build_tiny_multimodal_model(arch, tokenizer=tokenizer, seed=seed)
    save_model_and_tokenizer(model, tokenizer, out_dir)
    build_tiny_media_processor_parts(arch).save_pretrained(out_dir)
    return out_dir
