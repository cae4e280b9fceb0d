"""Importing reward models saved by LlamaFactory, TRL's legacy value-head wrapper, the DiscoRM fork, and
`AutoModelForSequenceClassification`: our scores must equal the ones computed directly from their weights."""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from discoalign.config.schema import FinetuningArguments, ModelArguments
from discoalign.errors import CheckpointError
from discoalign.models.heads import VARIANCE_FLOOR
from discoalign.models.loader import load_model_with_heads
from discoalign.models.tiny import build_tiny_model

ROWS = ["bright calm garden", "Topic: music. Describe a river. quick gentle brave", "rude"]
H = 64


def _heads(seed: int) -> dict[str, torch.Tensor]:
    """Random LlamaFactory/TRL-style v_head and DiscoRM var_head tensors with their exact key names and shapes."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "v_head.summary.weight": torch.randn(1, H, generator=gen) * 0.05,
        "v_head.summary.bias": torch.randn(1, generator=gen),
        "var_head.var.weight": torch.randn(1, H, generator=gen) * 0.05,
        "var_head.var.bias": torch.randn(1, generator=gen),
    }


def _load(path: str, disco: bool = False, **ft):
    return load_model_with_heads(
        ModelArguments(model_name_or_path=path),
        FinetuningArguments(add_disco_head=disco, **ft),
        add_value_head=True,
        is_trainable=False,
    )


@torch.no_grad()
def _last_hidden(causal_lm, tokenizer, text: str) -> torch.Tensor:
    """(H,) last-layer hidden state at the last token, computed the plain transformers way."""
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    return causal_lm(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, -1]


@torch.no_grad()
def _our_scores(model, tokenizer, text: str):
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    mean, var = model.score(ids, torch.ones_like(ids))
    return mean[0], None if var is None else var[0]


def _base_dir(tmp_path, tiny_dirs, arch: str) -> str:
    return shutil.copytree(tiny_dirs[arch], str(tmp_path / f"{arch}-rm"))


@pytest.mark.parametrize("filename", ["value_head.safetensors", "value_head.bin"])
def test_llamafactory_value_head_file(tmp_path, tiny_dirs, tokenizer, filename):
    path = _base_dir(tmp_path, tiny_dirs, "llama")
    heads = {k: v for k, v in _heads(0).items() if k.startswith("v_head")}
    if filename.endswith(".safetensors"):
        save_file(heads, os.path.join(path, filename), metadata={"format": "pt"})
    else:
        torch.save(heads, os.path.join(path, filename))
    model, _ = _load(path)
    base = build_tiny_model("llama", tokenizer)
    w, b = heads["v_head.summary.weight"][0], heads["v_head.summary.bias"][0]
    for text in ROWS:
        expected = _last_hidden(base, tokenizer, text) @ w + b
        torch.testing.assert_close(_our_scores(model, tokenizer, text)[0], expected, atol=1e-6, rtol=0)


def test_discorm_value_and_variance_heads(tmp_path, tiny_dirs, tokenizer, caplog):
    path = _base_dir(tmp_path, tiny_dirs, "qwen2")
    heads = _heads(1)
    save_file(heads, os.path.join(path, "value_head.safetensors"))
    with caplog.at_level(logging.INFO):
        model, _ = _load(path, disco=True)
    assert "value_head and variance_head" in caplog.text
    base = build_tiny_model("qwen2", tokenizer)
    for text in ROWS:
        h = _last_hidden(base, tokenizer, text)
        mean, var = _our_scores(model, tokenizer, text)
        torch.testing.assert_close(
            mean, h @ heads["v_head.summary.weight"][0] + heads["v_head.summary.bias"][0], atol=1e-6, rtol=0
        )
        # DiscoRM's variance is softplus(raw); ours adds the 1e-6 floor.
        raw = h @ heads["var_head.var.weight"][0] + heads["var_head.var.bias"][0]
        torch.testing.assert_close(var, F.softplus(raw) + VARIANCE_FLOOR, atol=1e-6, rtol=0)


def test_trl_legacy_v_head_inside_model_weights(tmp_path, tokenizer):
    """TRL's legacy wrapper saved `v_head.*` next to the backbone keys in model.safetensors (here sharded)."""
    base = build_tiny_model("qwen3", tokenizer)
    path = str(tmp_path / "trl")
    base.save_pretrained(path)
    tokenizer.save_pretrained(path)
    heads = {k: v for k, v in _heads(2).items() if k.startswith("v_head")}
    # Re-shard: backbone in one file, v_head in another, with the index TRL reads.
    os.rename(os.path.join(path, "model.safetensors"), os.path.join(path, "model-00001-of-00002.safetensors"))
    save_file(heads, os.path.join(path, "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
    weight_map = {k: "model-00001-of-00002.safetensors" for k in base.state_dict()}
    weight_map.update({k: "model-00002-of-00002.safetensors" for k in heads})
    json.dump({"metadata": {}, "weight_map": weight_map}, open(os.path.join(path, "model.safetensors.index.json"), "w"))
    model, _ = _load(path)
    for text in ROWS:
        expected = (
            _last_hidden(base, tokenizer, text) @ heads["v_head.summary.weight"][0] + heads["v_head.summary.bias"][0]
        )
        torch.testing.assert_close(_our_scores(model, tokenizer, text)[0], expected, atol=1e-6, rtol=0)


def test_trl_legacy_lora_adapter_with_v_head_bin(tmp_path, tokenizer):
    """Under LoRA TRL's legacy wrapper wrote the adapter plus `pytorch_model.bin` holding only `v_head.*`."""
    from peft import LoraConfig, get_peft_model

    base = build_tiny_model("llama", tokenizer)
    base_dir = str(tmp_path / "base")
    base.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    peft_model = get_peft_model(
        build_tiny_model("llama", tokenizer), LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
    )
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    peft_model.peft_config["default"].base_model_name_or_path = base_dir
    adapter_dir = str(tmp_path / "adapter")
    peft_model.save_pretrained(adapter_dir)
    heads = {k: v for k, v in _heads(3).items() if k.startswith("v_head")}
    torch.save(heads, os.path.join(adapter_dir, "pytorch_model.bin"))
    model, _ = _load(adapter_dir)
    assert model.is_peft
    for text in ROWS:
        expected = (
            _last_hidden(peft_model, tokenizer, text) @ heads["v_head.summary.weight"][0]
            + heads["v_head.summary.bias"][0]
        )
        torch.testing.assert_close(_our_scores(model, tokenizer, text)[0], expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_sequence_classification_reward_model(tmp_path, tokenizer, arch, caplog):
    from transformers import AutoModelForSequenceClassification

    config = build_tiny_model(arch, tokenizer).config
    config.num_labels = 1
    torch.manual_seed(5)
    rm = AutoModelForSequenceClassification.from_config(config).eval()
    path = str(tmp_path / f"{arch}-seqcls")
    rm.save_pretrained(path)
    tokenizer.save_pretrained(path)
    with caplog.at_level(logging.WARNING):
        model, _ = _load(path)
    assert "sequence-classification" in caplog.text
    assert model.value_head.summary.bias.item() == 0.0
    for text in ROWS:
        with torch.no_grad():
            expected = rm(torch.tensor([tokenizer(text)["input_ids"]])).logits[0, 0]
        torch.testing.assert_close(_our_scores(model, tokenizer, text)[0], expected, atol=1e-6, rtol=0)


def test_sequence_classifier_with_two_labels_is_refused(tmp_path, tokenizer):
    from transformers import AutoModelForSequenceClassification

    config = build_tiny_model("llama", tokenizer).config
    config.num_labels = 2
    path = str(tmp_path / "cls2")
    AutoModelForSequenceClassification.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    with pytest.raises(CheckpointError, match=r"\(2, 64\).*not a reward model"):
        _load(path)


def test_value_head_file_with_unknown_keys(tmp_path, tiny_dirs):
    path = _base_dir(tmp_path, tiny_dirs, "llama")
    save_file({"head.weight": torch.zeros(1, H)}, os.path.join(path, "value_head.safetensors"))
    with pytest.raises(CheckpointError, match=r"value_head\.safetensors.*v_head\.summary\.weight"):
        _load(path)


def test_value_head_bin_with_pickled_code_is_not_unpickled(tmp_path, tiny_dirs):
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    path = _base_dir(tmp_path, tiny_dirs, "llama")
    with open(os.path.join(path, "value_head.bin"), "wb") as f:
        pickle.dump({"v_head.summary.weight": Payload()}, f)
    with pytest.raises(CheckpointError, match=r"value_head\.bin.*could not be read"):
        _load(path)
    assert not os.path.exists(tmp_path / "pwned")
