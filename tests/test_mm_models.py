"""Multimodal models: modality detection, supported inputs, tiny models, M-RoPE positions, LoRA and freezing."""

from __future__ import annotations

import pytest
import torch

from discoalign.config.schema import FinetuningArguments, ModelArguments
from discoalign.errors import ConfigError
from discoalign.models.loader import load_model_with_heads
from discoalign.models.modality import ActorModality, detect_modality, select_model_inputs
from discoalign.models.tiny_multimodal import (
    TINY_MULTIMODAL_ARCHS,
    build_tiny_multimodal_model,
    build_tiny_multimodal_tokenizer,
    write_tiny_multimodal_model,
)

VISION_ARCHS = ("qwen2-vl", "qwen2.5-vl")
EXPECTED_SUPPORTED = {
    "qwen2-vl": ("pixel_values", "image_grid_thw", "mm_token_type_ids", "pixel_values_videos", "video_grid_thw"),
    "qwen2.5-vl": (
        "pixel_values", "image_grid_thw", "mm_token_type_ids", "pixel_values_videos", "video_grid_thw",
        "second_per_grid_ts",
    ),
    "qwen2-audio": ("input_features", "feature_attention_mask"),
}  # fmt: skip
LM_TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def load(arch: str, **ft):
    settings = dict(add_disco_head=True)
    settings.update(ft)
    return load_model_with_heads(
        ModelArguments(model_name_or_path=f"builtin:tiny-{arch}"), FinetuningArguments(**settings), add_value_head=True
    )


# ---- modality ------------------------------------------------------------------------------------------


def test_detect_modality_from_config_dicts_and_objects():
    assert detect_modality({"model_type": "qwen3"}) == ActorModality.LANGUAGE_ONLY
    assert detect_modality({"vision_config": {"depth": 1}}) == ActorModality.VISION_LANGUAGE
    assert detect_modality({"audio_config": {}, "text_config": {}}) == ActorModality.AUDIO_LANGUAGE
    assert detect_modality({"vision_config": {}, "audio_config": {}}) == ActorModality.OMNI
    assert detect_modality({"thinker_config": {}}) == ActorModality.OMNI
    assert detect_modality({"vision_config": None}) == ActorModality.LANGUAGE_ONLY
    assert detect_modality(build_tiny_multimodal_model("qwen2-audio").config) == ActorModality.AUDIO_LANGUAGE


@pytest.mark.parametrize("arch", TINY_MULTIMODAL_ARCHS)
def test_supported_parameters_are_what_the_forward_takes(arch):
    model, _ = load(arch)
    expected_modality = ActorModality.AUDIO_LANGUAGE if arch == "qwen2-audio" else ActorModality.VISION_LANGUAGE
    assert model.modality == expected_modality
    assert model.supported_parameters == EXPECTED_SUPPORTED[arch]
    batch = {"pixel_values": 1, "input_features": 2, "feature_attention_mask": None, "margin": 3, "labels": 4}
    expected = {"pixel_values": 1} if arch != "qwen2-audio" else {"input_features": 2}
    assert select_model_inputs(batch, model.supported_parameters) == expected


def test_text_models_take_no_media():
    model, _ = load_model_with_heads(
        ModelArguments(model_name_or_path="builtin:tiny-qwen3"), FinetuningArguments(), add_value_head=True
    )
    assert model.modality == ActorModality.LANGUAGE_ONLY
    assert model.supported_parameters == () and model.media_processor is None


# ---- tiny models ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", TINY_MULTIMODAL_ARCHS)
def test_tiny_multimodal_models_are_deterministic_and_reload_from_a_directory(arch, tmp_path):
    a, b = build_tiny_multimodal_model(arch), build_tiny_multimodal_model(arch)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.lm_head.weight, build_tiny_multimodal_model(arch, seed=1).lm_head.weight)
    assert a.config.get_text_config().hidden_size == 64

    directory = write_tiny_multimodal_model(arch, str(tmp_path / arch))
    from_dir, tokenizer = load_model_with_heads(
        ModelArguments(model_name_or_path=directory), FinetuningArguments(), add_value_head=False, is_trainable=False
    )
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), from_dir.causal_lm.state_dict().values()))
    text = "<|im_start|>user\nhi <|vision_start|><|image_pad|><|vision_end|><|audio_bos|><|AUDIO|><|im_end|>"
    assert tokenizer(text)["input_ids"] == build_tiny_multimodal_tokenizer(arch)(text)["input_ids"]
    media = from_dir.media_processor
    assert media is not None and (media.takes_images != media.takes_audio)


def test_placeholder_tokens_are_single_special_tokens():
    tokenizer = build_tiny_multimodal_tokenizer("qwen2-vl")
    ids = tokenizer("a<|image_pad|><|image_pad|>b")["input_ids"]
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert ids.count(pad) == 2 and pad >= 1024  # appended after the 1024 trained tokens
    assert build_tiny_multimodal_model("qwen2-vl").config.image_token_id == pad


# ---- positions -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", VISION_ARCHS)
def test_hidden_states_with_images_match_the_model_s_own_m_rope(arch):
    """With image grids the model derives 3-D positions itself; ours must not override them with 1-D ones."""
    from PIL import Image

    model, tokenizer = load(arch)
    media = model.media_processor
    image = Image.new("RGB", (56, 28), (200, 30, 30))
    inputs = media.image_inputs([image])
    n = int(inputs["image_grid_thw"].prod()) // 4
    ids = tokenizer("Look: <|vision_start|>" + "<|image_pad|>" * n + "<|vision_end|> what colour?")["input_ids"]
    input_ids = torch.tensor([ids + [tokenizer.pad_token_id] * 3])
    mask = torch.tensor([[1] * len(ids) + [0] * 3])
    media_inputs = media.batch_inputs([image], [], input_ids)
    with torch.no_grad():
        ours = model.hidden_states(input_ids, mask, **media_inputs)
        theirs = model.causal_lm.model(input_ids=input_ids, attention_mask=mask, use_cache=False, **media_inputs)
        flat = model.hidden_states(input_ids, mask, position_ids=torch.arange(input_ids.shape[1])[None], **media_inputs)
    real = mask[0].bool()
    assert torch.equal(ours[0, real], theirs.last_hidden_state[0, real])
    assert not torch.allclose(ours[0, real], flat[0, real])  # M-RoPE positions differ from 0..T-1


# ---- which parts train ---------------------------------------------------------------------------------


def _lora_modules(model) -> set[str]:
    return {n.split(".lora_")[0] for n, _ in model.named_parameters() if ".lora_A." in n}


@pytest.mark.parametrize("arch", TINY_MULTIMODAL_ARCHS)
def test_lora_wraps_only_the_language_model_by_default(arch):
    model, _ = load(arch, finetuning_type="lora", lora_rank=4)
    wrapped = _lora_modules(model)
    prefix = "backbone.base_model.model.model.language_model.layers."
    assert wrapped and all(name.startswith(prefix) for name in wrapped), sorted(wrapped)[:5]
    assert {name.rsplit(".", 1)[-1] for name in wrapped} == LM_TARGETS
    assert len(wrapped) == 2 * len(LM_TARGETS)  # 2 layers
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".lora_" in n or n.startswith(("value_head.", "variance_head.")) for n in trainable)


def test_unfrozen_towers_get_lora_too():
    vl, _ = load("qwen2.5-vl", finetuning_type="lora", lora_rank=4, freeze_vision_tower=False)
    vision = {n for n in _lora_modules(vl) if ".model.visual." in n}
    # the vision MLP's gate/up/down and attention qkv/proj are adapted; the merger (projector) stays frozen,
    # and the patch embedding (a Conv3d called `proj`) is never wrapped
    assert {n.rsplit(".", 1)[-1] for n in vision} == {"qkv", "proj", "gate_proj", "up_proj", "down_proj"}
    assert not any(".merger." in n or "patch_embed" in n for n in vision)
    projector_too, _ = load("qwen2-vl", finetuning_type="lora", lora_rank=4, freeze_multi_modal_projector=False)
    assert {n for n in _lora_modules(projector_too) if ".visual." in n} == {
        "backbone.base_model.model.model.visual.merger.mlp.0", "backbone.base_model.model.model.visual.merger.mlp.2"
    }  # fmt: skip
    audio, _ = load("qwen2-audio", finetuning_type="lora", lora_rank=4, freeze_audio_tower=False)
    assert any(".audio_tower.layers.0.self_attn.q_proj" in n for n in _lora_modules(audio))
    assert not any("multi_modal_projector" in n for n in _lora_modules(audio))


def test_explicit_lora_target_names_stay_in_the_language_model():
    model, _ = load("qwen2-audio", finetuning_type="lora", lora_rank=4, lora_target="q_proj,v_proj")
    wrapped = _lora_modules(model)
    assert len(wrapped) == 4 and all(".language_model." in n for n in wrapped)  # not the audio tower's q_proj
    with pytest.raises(ConfigError, match=r"lora_target.*'qkv'"):
        load("qwen2-vl", finetuning_type="lora", lora_target="qkv")  # a vision-tower name, frozen by default


@pytest.mark.parametrize("arch", TINY_MULTIMODAL_ARCHS)
def test_full_fine_tuning_freezes_towers_and_projector_by_default(arch):
    model, _ = load(arch)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    tower = ".audio_tower." if arch == "qwen2-audio" else ".visual."
    assert not any(tower in n or "multi_modal_projector" in n for n in trainable)
    assert any(".language_model." in n for n in trainable) and "backbone.lm_head.weight" in trainable
    unfrozen, _ = load(arch, freeze_vision_tower=False, freeze_audio_tower=False)
    unfrozen_trainable = {n for n, p in unfrozen.named_parameters() if p.requires_grad}
    assert any(tower in n for n in unfrozen_trainable)
    projector = ".visual.merger." if arch != "qwen2-audio" else ".multi_modal_projector."
    assert not any(projector in n for n in unfrozen_trainable)  # the projector has its own switch


def test_unknown_builtin_lists_the_multimodal_ones():
    with pytest.raises(ConfigError, match=r"builtin:tiny-qwen2-vl.*builtin:tiny-qwen2-audio"):
        load_model_with_heads(ModelArguments(model_name_or_path="builtin:tiny-llava"), FinetuningArguments(),
                              add_value_head=True)  # fmt: skip


@pytest.mark.parametrize("arch", TINY_MULTIMODAL_ARCHS)
def test_resuming_a_full_checkpoint_restores_the_backbone(arch, tmp_path):
    """transformers writes composite models under their hub key names; resuming must map them back."""
    from discoalign.models.checkpoint import load_checkpoint_weights, save_checkpoint

    model, tokenizer = load(arch)
    save_checkpoint(model, str(tmp_path), tokenizer)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)
    load_checkpoint_weights(model, str(tmp_path))
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())


def test_omni_checkpoints_are_refused_clearly(tmp_path):
    import json

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_5_omni", "thinker_config": {}}))
    (tmp_path / "tokenizer.json").write_text("{}")
    from discoalign.models.backbone import _from_pretrained

    with pytest.raises(ConfigError, match=r"omni.*qwen2_5_omni"):
        _from_pretrained(str(tmp_path), ModelArguments(model_name_or_path=str(tmp_path)), torch.float32)
