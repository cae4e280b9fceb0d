"""PPO's reward model: LoRA reward adapters (ours and LlamaFactory's layout) and imported LlamaFactory/TRL value-head
checkpoints score a fixed batch exactly as the same weights built directly; bad `reward_model` settings fail clearly."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from helpers import scoring_batch
from safetensors.torch import save_file

from discoalign.config.schema import FinetuningArguments, ModelArguments
from discoalign.errors import CheckpointError, ConfigError
from discoalign.models.checkpoint import save_checkpoint
from discoalign.models.heads import ValueHead
from discoalign.models.loader import load_model_with_heads
from discoalign.models.lora import apply_lora
from discoalign.models.model_with_heads import ModelWithHeads
from discoalign.models.reward_model import load_reward_model, score_responses
from discoalign.models.tiny import build_tiny_model, build_tiny_tokenizer

BASE = "builtin:tiny-qwen3"
MODEL = ModelArguments(model_name_or_path=BASE)  # the policy's model_name_or_path


def _ppo_args(reward_model: str, **ft):
    return FinetuningArguments(stage="ppo", reward_model=reward_model, **ft)


def _perturb(module: torch.nn.Module, pattern: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if pattern in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)


def test_our_lora_reward_adapter_scores_like_the_model_that_saved_it(tmp_path, tokenizer):
    torch.manual_seed(0)
    ft = FinetuningArguments(finetuning_type="lora", add_disco_head=True)
    model, _ = load_model_with_heads(ModelArguments(model_name_or_path=BASE), ft, add_value_head=True)
    _perturb(model, "lora_B", 1)
    _perturb(model, "variance_head", 2)
    save_checkpoint(model, str(tmp_path / "rm"), tokenizer)
    batch = scoring_batch(tokenizer)
    expected = score_responses(model.eval(), *batch)

    rm = load_reward_model(MODEL, _ppo_args(str(tmp_path / "rm"), reward_model_type="lora"), tokenizer)
    assert rm.is_peft and rm.variance_head is not None
    assert not any(p.requires_grad for p in rm.parameters())
    mean, variance = score_responses(rm, *batch)
    assert torch.equal(mean, expected[0]) and torch.equal(variance, expected[1])

    # The adapter's own base is unavailable here: it goes on top of `model_name_or_path` instead.
    config_path = tmp_path / "rm" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = str(tmp_path / "moved-away")
    config_path.write_text(json.dumps(config))
    rm = load_reward_model(MODEL, _ppo_args(str(tmp_path / "rm"), reward_model_type="lora"), tokenizer)
    mean, variance = score_responses(rm, *batch)
    assert torch.equal(mean, expected[0]) and torch.equal(variance, expected[1])


def _value_head_file(path: str, hidden: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    heads = {"v_head.summary.weight": torch.randn(1, hidden, generator=gen) * 0.1,
             "v_head.summary.bias": torch.randn(1, generator=gen)}  # fmt: skip
    save_file(heads, os.path.join(path, "value_head.safetensors"), metadata={"format": "pt"})
    return heads


def _direct(causal_lm, heads: dict[str, torch.Tensor]) -> ModelWithHeads:
    """The same weights assembled by hand: the backbone plus a value head holding v_head.summary.*."""
    value_head = ValueHead(causal_lm.config.hidden_size)
    with torch.no_grad():
        value_head.summary.weight.copy_(heads["v_head.summary.weight"])
        value_head.summary.bias.copy_(heads["v_head.summary.bias"])
    return ModelWithHeads(causal_lm, {"value_head": value_head}).eval()


def test_llamafactory_value_head_checkpoint(tmp_path, tiny_dirs, tokenizer):
    path = shutil.copytree(tiny_dirs["qwen2"], str(tmp_path / "lf-rm"))
    heads = _value_head_file(path, 64, seed=3)
    batch = scoring_batch(tokenizer)
    rm = load_reward_model(MODEL, _ppo_args(path), tokenizer)
    mean, variance = score_responses(rm, *batch)
    assert variance is None
    expected, _ = score_responses(_direct(build_tiny_model("qwen2", tokenizer), heads), *batch)
    assert torch.equal(mean, expected)
    # and the number is the plain transformers one: w . h(last token) + b, row by row without padding
    lm = build_tiny_model("qwen2", tokenizer)
    for i in range(2):
        ids = torch.cat([batch[0][i][batch[1][i].bool()], batch[2][i][batch[3][i].bool()]]).unsqueeze(0)
        with torch.no_grad():
            h = lm(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, -1]
        direct = h @ heads["v_head.summary.weight"][0] + heads["v_head.summary.bias"][0]
        torch.testing.assert_close(mean[i], direct, atol=1e-5, rtol=1e-5)


def test_llamafactory_lora_reward_adapter_with_value_head_file(tmp_path, tokenizer):
    causal_lm = build_tiny_model("qwen3", tokenizer)
    causal_lm.name_or_path = BASE
    peft_model = apply_lora(causal_lm, lora_rank=4, lora_alpha=8, lora_dropout=0.0, lora_target="all")
    _perturb(peft_model, "lora_B", 4)
    path = str(tmp_path / "lf-lora-rm")
    peft_model.save_pretrained(path, save_embedding_layers=False)
    heads = _value_head_file(path, 64, seed=5)
    batch = scoring_batch(tokenizer)
    rm = load_reward_model(MODEL, _ppo_args(path, reward_model_type="lora"), tokenizer)
    mean, _ = score_responses(rm, *batch)
    expected, _ = score_responses(_direct(peft_model, heads), *batch)
    assert torch.equal(mean, expected)


# ---- bad settings ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scalar_rm(tmp_path_factory):
    torch.manual_seed(0)
    model, tokenizer = load_model_with_heads(MODEL, FinetuningArguments(), add_value_head=True)
    return save_checkpoint(model, str(tmp_path_factory.mktemp("scalar-rm")), tokenizer)


@pytest.mark.parametrize(
    "name, error, words",
    [
        (None, ConfigError, ["reward_model"]),
        ("builtin:tiny-qwen3", ConfigError, ["reward_model: builtin:tiny-qwen3", "stage: rm"]),
        ("/nonexistent/rm-dir", CheckpointError, ["reward_model: /nonexistent/rm-dir", "does not exist"]),
    ],
)
def test_bad_reward_model_names(name, error, words, tokenizer):
    with pytest.raises(error) as info:
        load_reward_model(MODEL, _ppo_args(name), tokenizer)
    for word in words:
        assert word in str(info.value)


def test_reward_model_is_a_file(tmp_path, tokenizer):
    path = tmp_path / "rm.safetensors"
    path.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="is a file"):
        load_reward_model(MODEL, _ppo_args(str(path)), tokenizer)


def test_plain_model_without_reward_head(tiny_dirs, tokenizer):
    with pytest.raises(CheckpointError, match="holds no reward head") as info:
        load_reward_model(MODEL, _ppo_args(tiny_dirs["qwen3"]), tokenizer)
    assert f"reward_model: {tiny_dirs['qwen3']}" in str(info.value)


def test_lora_type_on_a_full_checkpoint(scalar_rm, tokenizer):
    with pytest.raises(CheckpointError, match="reward_model_type: lora") as info:
        load_reward_model(MODEL, _ppo_args(scalar_rm, reward_model_type="lora"), tokenizer)
    assert "adapter_config.json" in str(info.value)


def test_risk_coefficient_needs_a_disco_reward_model(scalar_rm, tokenizer):
    with pytest.raises(ConfigError, match="disco_risk_coef: 0.5") as info:
        load_reward_model(MODEL, _ppo_args(scalar_rm, disco_risk_coef=0.5), tokenizer)
    assert "variance head" in str(info.value)


def test_reward_model_with_another_tokenizer(scalar_rm, tokenizer):
    other = build_tiny_tokenizer()
    other.add_tokens(["<extra-token>"])
    with pytest.raises(ConfigError, match="tokenizer different"):
        load_reward_model(MODEL, _ppo_args(scalar_rm), other)


def test_loading_the_reward_model_leaves_the_random_stream_alone(scalar_rm, tokenizer):
    torch.manual_seed(11)
    load_reward_model(MODEL, _ppo_args(scalar_rm), tokenizer)
    after = torch.rand(3)
    torch.manual_seed(11)
    assert torch.equal(after, torch.rand(3))
