"""Checkpoints: layout, exact save/reload (full and LoRA + heads), compatibility rules, broken checkpoints."""

from __future__ import annotations

import json
import logging
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from discoalign.config.builtin_models import TINY_ARCHS
from discoalign.config.schema import FinetuningArguments, ModelArguments
from discoalign.errors import CheckpointError
from discoalign.models.checkpoint import load_checkpoint_weights, load_heads, save_checkpoint
from discoalign.models.heads import VARIANCE_FLOOR
from discoalign.models.loader import load_model_with_heads

TEXTS = ["bright calm garden", "Topic: music. Describe a river. quick gentle", "kind"]


def _load(name: str, add_value_head: bool = True, is_trainable: bool = True, **ft):
    return load_model_with_heads(
        ModelArguments(model_name_or_path=name),
        FinetuningArguments(**ft),
        add_value_head=add_value_head,
        is_trainable=is_trainable,
    )


@torch.no_grad()
def _perturb(model, seed: int = 0) -> None:
    """Move every trainable weight, as training would, so that a reload that drops anything shows."""
    gen = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        if param.requires_grad:
            param.add_(torch.randn(param.shape, generator=gen, dtype=param.dtype) * 0.05)


def _batch(tok):
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


@torch.no_grad()
def _scores(model, tok):
    return model.score(*_batch(tok))


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("finetuning_type", ["full", "lora"])
def test_save_and_reload_gives_identical_scores(tmp_path, arch, finetuning_type):
    model, tok = _load(f"builtin:tiny-{arch}", finetuning_type=finetuning_type, add_disco_head=True, lora_rank=4)
    _perturb(model)
    mean, var = _scores(model, tok)
    out = save_checkpoint(model, str(tmp_path / "ckpt"), tok)

    files = set(os.listdir(out))
    assert {"heads.safetensors", "heads_config.json", "tokenizer.json"} <= files
    if finetuning_type == "lora":
        assert {"adapter_config.json", "adapter_model.safetensors"} <= files and "model.safetensors" not in files
        assert (
            json.load(open(os.path.join(out, "adapter_config.json")))["base_model_name_or_path"]
            == f"builtin:tiny-{arch}"
        )
    else:
        assert "model.safetensors" in files and "adapter_config.json" not in files
    assert set(load_file(os.path.join(out, "heads.safetensors"))) == {
        "value_head.summary.weight",
        "value_head.summary.bias",
        "variance_head.summary.weight",
        "variance_head.summary.bias",
    }
    config = json.load(open(os.path.join(out, "heads_config.json")))
    assert config["value_head"] and config["variance_head"] and not config["beta_head"]
    assert config["hidden_size"] == 64 and config["finetuning_type"] == finetuning_type
    assert config["base_model_name_or_path"] == f"builtin:tiny-{arch}"
    assert {"head_dropout", "head_init_std", "beta_head_epsilon"} <= set(config)

    reloaded, tok2 = _load(out, is_trainable=False, add_disco_head=True, finetuning_type=finetuning_type)
    assert reloaded.is_peft == (finetuning_type == "lora")
    mean2, var2 = _scores(reloaded, tok2)
    torch.testing.assert_close(mean2, mean, atol=0, rtol=0)
    torch.testing.assert_close(var2, var, atol=0, rtol=0)


def test_lora_checkpoint_continues_training_or_merges(tmp_path):
    model, tok = _load("builtin:tiny-llama", finetuning_type="lora", lora_rank=4)
    _perturb(model)
    mean, _ = _scores(model, tok)
    out = save_checkpoint(model, str(tmp_path / "lora"), tok)
    again, _ = _load(out, finetuning_type="lora")
    assert again.is_peft and any(p.requires_grad for n, p in again.named_parameters() if "lora_" in n)
    torch.testing.assert_close(_scores(again, tok)[0], mean, atol=0, rtol=0)
    merged, _ = _load(out, finetuning_type="full")
    assert not merged.is_peft and all(p.requires_grad for p in merged.parameters())
    torch.testing.assert_close(_scores(merged, tok)[0], mean, atol=1e-5, rtol=0)


def test_beta_head_round_trip_and_epsilon(tmp_path, caplog):
    model, tok = _load(
        "builtin:tiny-qwen3", add_value_head=False, stage="dpo", add_beta_head=True, beta_head_epsilon=0.3
    )
    with torch.no_grad():
        model.beta_head.summary.weight.normal_()
    out = save_checkpoint(model, str(tmp_path / "dpo"), tok)
    assert json.load(open(os.path.join(out, "heads_config.json")))["beta_head_epsilon"] == 0.3
    with caplog.at_level(logging.WARNING):
        again, _ = _load(out, add_value_head=False, stage="dpo", add_beta_head=True, beta_head_epsilon=0.5)
    assert torch.equal(again.beta_head.summary.weight, model.beta_head.summary.weight)
    assert "beta_head_epsilon=0.3" in caplog.text


def test_value_only_checkpoint_wanted_with_variance_head_warns_and_starts_at_one(tmp_path, caplog):
    model, tok = _load("builtin:tiny-gpt2")
    _perturb(model)
    mean, _ = _scores(model, tok)
    out = save_checkpoint(model, str(tmp_path / "bt"), tok)
    with caplog.at_level(logging.WARNING):
        disco, _ = _load(out, add_disco_head=True)
    assert "has a value head but no variance head" in caplog.text and "sigma^2 = 1" in caplog.text
    mean2, var2 = _scores(disco, tok)
    torch.testing.assert_close(mean2, mean, atol=0, rtol=0)
    torch.testing.assert_close(var2, torch.full_like(var2, 1.0 + VARIANCE_FLOOR), atol=1e-7, rtol=0)


def test_variance_checkpoint_used_as_scalar_rm_logs_and_keeps_mean(tmp_path, caplog):
    model, tok = _load("builtin:tiny-qwen2", add_disco_head=True)
    _perturb(model)
    mean, _ = _scores(model, tok)
    out = save_checkpoint(model, str(tmp_path / "disco"), tok)
    with caplog.at_level(logging.INFO):
        scalar, _ = _load(out)
    assert "mean is used and the variance ignored" in caplog.text
    mean2, var2 = _scores(scalar, tok)
    assert var2 is None
    torch.testing.assert_close(mean2, mean, atol=0, rtol=0)


def test_plain_model_dir_gives_fresh_heads_without_warnings(tiny_dirs, caplog):
    with caplog.at_level(logging.WARNING, logger="discoalign"):
        model, _ = _load(tiny_dirs["llama"], add_disco_head=True)
    assert caplog.records == []
    assert model.variance_head.summary.weight.abs().sum() == 0


def test_resume_loads_weights_into_an_existing_model(tmp_path):
    for finetuning_type in ("full", "lora"):
        model, tok = _load("builtin:tiny-llama", finetuning_type=finetuning_type, add_disco_head=True, lora_rank=4)
        _perturb(model, seed=1)
        mean, var = _scores(model, tok)
        out = save_checkpoint(model, str(tmp_path / finetuning_type), tok)
        fresh, _ = _load("builtin:tiny-llama", finetuning_type=finetuning_type, add_disco_head=True, lora_rank=4)
        load_checkpoint_weights(fresh, out)
        mean2, var2 = _scores(fresh, tok)
        torch.testing.assert_close(mean2, mean, atol=0, rtol=0)
        torch.testing.assert_close(var2, var, atol=0, rtol=0)


# ---- broken checkpoints ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model, tok = _load("builtin:tiny-llama", add_disco_head=True)
    return save_checkpoint(model, str(tmp_path_factory.mktemp("ckpt") / "rm"), tok)


def _copy(saved: str, tmp_path) -> str:
    return shutil.copytree(saved, str(tmp_path / "copy"))


def test_missing_dir(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(CheckpointError, match=r"model_name_or_path.*nope.*does not exist"):
        _load(missing)


def test_dir_without_config(saved, tmp_path):
    path = _copy(saved, tmp_path)
    os.remove(os.path.join(path, "config.json"))
    with pytest.raises(CheckpointError, match=r"config\.json is missing"):
        _load(path)


def test_truncated_model_weights(saved, tmp_path):
    path = _copy(saved, tmp_path)
    weights = os.path.join(path, "model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    with pytest.raises(CheckpointError, match=str(tmp_path)):
        _load(path)


def test_heads_config_lists_a_head_the_weights_lack(saved, tmp_path):
    path = _copy(saved, tmp_path)
    tensors = load_file(os.path.join(path, "heads.safetensors"))
    save_file(
        {k: v for k, v in tensors.items() if not k.startswith("variance_head")}, os.path.join(path, "heads.safetensors")
    )
    with pytest.raises(CheckpointError, match=r"variance_head.*variance_head\.summary\.weight"):
        _load(path, add_disco_head=True)


def test_heads_file_missing(saved, tmp_path):
    path = _copy(saved, tmp_path)
    os.remove(os.path.join(path, "heads.safetensors"))
    with pytest.raises(CheckpointError, match=r"heads\.safetensors is missing"):
        _load(path)


def test_heads_file_corrupt(saved, tmp_path):
    path = _copy(saved, tmp_path)
    with open(os.path.join(path, "heads.safetensors"), "wb") as f:
        f.write(b"not a safetensors file")
    with pytest.raises(CheckpointError, match=r"heads\.safetensors.*could not be read"):
        _load(path)


def test_heads_config_not_json(saved, tmp_path):
    path = _copy(saved, tmp_path)
    with open(os.path.join(path, "heads_config.json"), "w") as f:
        f.write("{broken")
    with pytest.raises(CheckpointError, match=r"heads_config\.json.*not valid JSON"):
        _load(path)


def test_head_of_another_hidden_size(saved, tmp_path):
    path = _copy(saved, tmp_path)
    tensors = load_file(os.path.join(path, "heads.safetensors"))
    tensors["value_head.summary.weight"] = torch.zeros(1, 32)
    save_file(tensors, os.path.join(path, "heads.safetensors"))
    model, _ = _load("builtin:tiny-llama")
    with pytest.raises(CheckpointError, match=r"value_head\.summary\.weight.*\(1, 32\).*\(1, 64\)"):
        load_heads(model, path)


def test_adapter_without_base(tmp_path):
    model, tok = _load("builtin:tiny-llama", finetuning_type="lora", lora_rank=2)
    path = save_checkpoint(model, str(tmp_path / "lora"), tok)
    for name in ("adapter_config.json", "heads_config.json"):
        file = os.path.join(path, name)
        config = json.load(open(file))
        config["base_model_name_or_path"] = None
        json.dump(config, open(file, "w"))
    with pytest.raises(CheckpointError, match=r"adapter_config\.json.*base_model_name_or_path"):
        _load(path, finetuning_type="lora")


def test_resume_into_a_model_of_the_other_kind(saved):
    lora, _ = _load("builtin:tiny-llama", finetuning_type="lora")
    with pytest.raises(CheckpointError, match=r"adapter_model\.safetensors.*LoRA"):
        load_checkpoint_weights(lora, saved)


@pytest.mark.parametrize("finetuning_type", ["full", "lora"])
def test_save_from_a_gathered_state_dict_equals_the_default_save(tmp_path, finetuning_type):
    """Distributed engines hand `_save` a gathered state dict; writing from it must give the same files' tensors."""
    model, tok = _load("builtin:tiny-qwen3", finetuning_type=finetuning_type, add_disco_head=True, lora_rank=2)
    _perturb(model)
    a = save_checkpoint(model, str(tmp_path / "a"))
    b = save_checkpoint(model, str(tmp_path / "b"), state_dict=model.state_dict())
    weights = "adapter_model.safetensors" if finetuning_type == "lora" else "model.safetensors"
    for name in (weights, "heads.safetensors"):
        ta, tb = load_file(os.path.join(a, name)), load_file(os.path.join(b, name))
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
