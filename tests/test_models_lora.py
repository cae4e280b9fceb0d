"""LoRA: automatic targets per architecture, what trains, the reference context, and use inside a Trainer."""

from __future__ import annotations

import pytest
import torch

from discoalign.config.builtin_models import TINY_ARCHS
from discoalign.config.schema import FinetuningArguments, ModelArguments
from discoalign.errors import ConfigError
from discoalign.models.loader import load_model_with_heads
from discoalign.models.lora import find_linear_targets
from discoalign.models.tiny import build_tiny_model, build_tiny_tokenizer

DECODER_TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
EXPECTED_TARGETS = {
    "llama": DECODER_TARGETS,
    "qwen2": DECODER_TARGETS,
    "qwen3": DECODER_TARGETS,
    "gpt2": {"c_attn", "c_proj", "c_fc"},
}  # GPT-2's Conv1D layers count as linear


def _lora_model(arch: str, **ft):
    settings = dict(finetuning_type="lora", lora_rank=4, add_disco_head=True)
    settings.update(ft)
    return load_model_with_heads(
        ModelArguments(model_name_or_path=f"builtin:tiny-{arch}"), FinetuningArguments(**settings), add_value_head=True
    )


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_auto_targets_are_every_linear_layer_but_the_lm_head(arch):
    model = build_tiny_model(arch)
    assert set(find_linear_targets(model)) == EXPECTED_TARGETS[arch]


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_only_lora_and_heads_train(arch):
    model, _ = _lora_model(arch)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    heads = {f"{h}.summary.{w}" for h in ("value_head", "variance_head") for w in ("weight", "bias")}
    assert heads <= trainable
    lora = trainable - heads
    assert lora and all(".lora_A." in n or ".lora_B." in n for n in lora)
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in lora}
    assert adapted == EXPECTED_TARGETS[arch]
    assert not any("lm_head" in n or "wte" in n or "embed_tokens" in n for n in lora)
    config = model.backbone.peft_config["default"]
    assert config.r == 4 and config.lora_alpha == 8  # default alpha = 2 * rank


def test_explicit_targets_and_alpha():
    model, _ = _lora_model("llama", lora_target="q_proj, v_proj", lora_alpha=3)
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if ".lora_" in n}
    assert adapted == {"q_proj", "v_proj"}
    assert model.backbone.peft_config["default"].lora_alpha == 3


def test_unknown_target_names_the_key_and_module():
    with pytest.raises(ConfigError, match=r"lora_target.*'qkv'.*q_proj"):
        _lora_model("llama", lora_target="q_proj,qkv")


def test_frozen_load_adds_no_adapter():
    model, _ = _lora_model("qwen2")
    frozen, _ = load_model_with_heads(
        ModelArguments(model_name_or_path="builtin:tiny-qwen2"),
        FinetuningArguments(finetuning_type="lora"),
        add_value_head=True,
        is_trainable=False,
    )
    assert model.is_peft and not frozen.is_peft
    assert not any(p.requires_grad for p in frozen.parameters())


@torch.no_grad()
def test_disable_adapter_gives_the_base_model():
    tok = build_tiny_tokenizer()
    model, _ = _lora_model("qwen3")
    base = build_tiny_model("qwen3", tok)
    ids = torch.tensor([tok("bright calm river")["input_ids"]])
    mask = torch.ones_like(ids)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.normal_(0, 0.5)
    with model.disable_adapter():
        ref = model.hidden_states(ids, mask)
    torch.testing.assert_close(ref, base.model(ids, attention_mask=mask).last_hidden_state, atol=1e-6, rtol=0)
    assert (model.hidden_states(ids, mask) - ref).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_trainer_with_gradient_checkpointing_trains_only_adapter_and_heads(tmp_path, arch):
    from transformers import Trainer, TrainingArguments

    model, tok = _lora_model(arch)
    rows = [{"input_ids": tok(f"bright calm garden number {i}")["input_ids"]} for i in range(4)]

    def collate(batch):
        width = max(len(r["input_ids"]) for r in batch)
        ids = torch.full((len(batch), width), tok.pad_token_id)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(batch):
            ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
            mask[i, : len(r["input_ids"])] = 1
        return {"input_ids": ids, "attention_mask": mask}

    class MeanToOne(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = model(**inputs)
            loss = (out.mean - 1.0).pow(2).mean() + out.variance.mean()
            return (loss, out) if return_outputs else loss

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        max_steps=2,
        learning_rate=1e-2,
        gradient_checkpointing=True,
        report_to="none",
        remove_unused_columns=False,
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    MeanToOne(model=model, args=args, train_dataset=rows, data_collator=collate).train()
    assert model.is_gradient_checkpointing
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert {"value_head.summary.weight", "variance_head.summary.bias"} <= changed
    assert any("lora_B" in n for n in changed)
    assert all(".lora_" in n or n.split(".")[0] in ("value_head", "variance_head") for n in changed)
