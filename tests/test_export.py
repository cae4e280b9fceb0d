"""`discoalign export`: LoRA merged, heads kept; each layout reloads to the same scores (plain transformers and ours)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from discoalign.config.schema import FinetuningArguments, ModelArguments
from discoalign.models.checkpoint import save_checkpoint
from discoalign.models.loader import load_model_with_heads

TEXTS = [
    "<|im_start|>user\nWhich is best?<|im_end|>\n<|im_start|>assistant\nThe blue one.<|im_end|>\n",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello, friend!<|im_end|>\n",
    "<|im_start|>user\nA longer question about colours and shapes?<|im_end|>\n<|im_start|>assistant\nRed.<|im_end|>\n",
]


def _batch(tokenizer):
    enc = tokenizer(TEXTS, add_special_tokens=False)
    width = max(len(ids) for ids in enc["input_ids"])
    ids = torch.full((len(TEXTS), width), tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(enc["input_ids"]):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask


def _perturb(module, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name or "_head" in name:  # LoRA B starts at 0: make the adapter matter
                p.add_(torch.randn(p.shape, generator=generator) * 0.05)


@pytest.fixture(scope="module")
def lora_rm(tmp_path_factory):
    """A LoRA Disco reward model on builtin:tiny-qwen3 with non-trivial adapter and heads, and its scores."""
    out = str(tmp_path_factory.mktemp("export") / "lora_rm")
    ft = FinetuningArguments(finetuning_type="lora", add_disco_head=True, lora_rank=4)
    model, tokenizer = load_model_with_heads(ModelArguments(model_name_or_path="builtin:tiny-qwen3"), ft,
                                             add_value_head=True)  # fmt: skip
    _perturb(model, 0)
    save_checkpoint(model, out, tokenizer=tokenizer)
    loaded, tokenizer = load_model_with_heads(ModelArguments(model_name_or_path=out),
                                              FinetuningArguments(add_disco_head=True), add_value_head=True,
                                              is_trainable=False)  # fmt: skip
    with torch.no_grad():
        mean, var = loaded.score(*_batch(tokenizer))
    return out, tokenizer, mean, var


def _ours(path, disco=True):
    model, tokenizer = load_model_with_heads(ModelArguments(model_name_or_path=path),
                                             FinetuningArguments(add_disco_head=disco), add_value_head=True,
                                             is_trainable=False)  # fmt: skip
    with torch.no_grad():
        return model.score(*_batch(tokenizer)), model


def test_lora_checkpoint_records_its_builtin_base(lora_rm):
    out, *_ = lora_rm
    assert json.load(open(os.path.join(out, "adapter_config.json")))["base_model_name_or_path"] == "builtin:tiny-qwen3"
    assert json.load(open(os.path.join(out, "heads_config.json")))["base_model_name_or_path"] == "builtin:tiny-qwen3"


def test_builtin_base_written_by_tiny_model_is_the_adapters_base(lora_rm, tmp_path):
    """docs/export.md: `discoalign tiny-model` writes the same weights, so plain peft can load the adapter on it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from discoalign.models.tiny import write_tiny_model

    out, tokenizer, _, _ = lora_rm
    base = AutoModelForCausalLM.from_pretrained(write_tiny_model("qwen3", str(tmp_path / "base")))
    peft_model = PeftModel.from_pretrained(base, out).eval()
    (_, _), ours = _ours(out)
    ids, mask = _batch(tokenizer)
    with torch.no_grad():
        theirs = peft_model(input_ids=ids, attention_mask=mask).logits
        mine = ours.causal_lm(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(theirs, mine, atol=1e-5, rtol=0)


def test_export_ours_merges_lora_and_keeps_heads(lora_rm, tmp_path):
    from discoalign.export import export_model

    src, _, mean, var = lora_rm
    out = str(tmp_path / "ours")
    result = export_model(src, out, "ours")
    assert result["merged_lora"] and result["heads"] == ["value_head", "variance_head"]
    assert not os.path.exists(os.path.join(out, "adapter_config.json"))
    assert os.path.isfile(os.path.join(out, "model.safetensors"))
    (m, v), model = _ours(out)
    assert not model.is_peft
    torch.testing.assert_close(m, mean, atol=1e-5, rtol=0)
    torch.testing.assert_close(v, var, atol=1e-5, rtol=0)


def test_export_seq_cls_loads_with_plain_transformers(lora_rm, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from discoalign.export import export_model

    src, tokenizer, mean, var = lora_rm
    out = str(tmp_path / "seq_cls")
    result = export_model(src, out, "seq_cls")
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["architectures"] == ["Qwen3ForSequenceClassification"] and len(config["id2label"]) == 1
    bias = result["value_head_bias"]
    assert config["discoalign_value_head_bias"] == pytest.approx(bias)
    plain = AutoModelForSequenceClassification.from_pretrained(out).eval()
    with torch.no_grad():
        logits = plain(*_batch(tokenizer)).logits[:, 0]
    torch.testing.assert_close(logits + bias, mean, atol=1e-5, rtol=0)
    # our loader reads it back exactly, bias and variance included
    (m, v), _ = _ours(out)
    torch.testing.assert_close(m, mean, atol=1e-5, rtol=0)
    torch.testing.assert_close(v, var, atol=1e-5, rtol=0)


def test_export_llamafactory_value_head(lora_rm, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from discoalign.export import export_model

    src, tokenizer, mean, var = lora_rm
    out = str(tmp_path / "llamafactory")
    export_model(src, out, "llamafactory")
    heads = load_file(os.path.join(out, "value_head.safetensors"))
    assert set(heads) == {"v_head.summary.weight", "v_head.summary.bias", "var_head.var.weight", "var_head.var.bias"}
    # plain transformers + the value head by hand: the last real token's final hidden state
    lm = AutoModelForCausalLM.from_pretrained(out).eval()
    ids, mask = _batch(tokenizer)
    with torch.no_grad():
        hidden = lm(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    last = hidden[torch.arange(len(ids)), mask.sum(1) - 1]
    by_hand = last @ heads["v_head.summary.weight"][0] + heads["v_head.summary.bias"][0]
    torch.testing.assert_close(by_hand, mean, atol=1e-5, rtol=0)
    (m, v), _ = _ours(out)  # our interop imports v_head and the DiscoRM var_head
    torch.testing.assert_close(m, mean, atol=1e-5, rtol=0)
    torch.testing.assert_close(v, var, atol=1e-5, rtol=0)


def test_export_cli_and_its_errors(lora_rm, tmp_path, tiny_dirs, capsys):
    from discoalign.cli.main import main

    src, *_ = lora_rm
    assert main(["export", "--model", src, "--out", str(tmp_path / "x"), "--layout", "seq_cls"]) == 0
    assert "LoRA merged" in capsys.readouterr().out
    assert main(["export", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "y")]) == 2
    assert "not a directory" in capsys.readouterr().err
    # a plain causal LM (no value head) exports as `ours` only
    assert (
        main(["export", "--model", tiny_dirs["qwen3"], "--out", str(tmp_path / "z"), "--layout", "llamafactory"]) == 2
    )
    assert "no value head" in capsys.readouterr().err
    assert main(["export", "--model", src, "--out", src]) == 2
