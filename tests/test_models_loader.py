"""The loader: builtin names, local dirs, hub names offline, attention fallback, heads and RNG decoupling."""

from __future__ import annotations

import logging

import pytest
import torch

from discoalign.config.schema import FinetuningArguments, ModelArguments
from discoalign.errors import CheckpointError, ConfigError
from discoalign.models import backbone as loader_module
from discoalign.models.checkpoint import save_checkpoint
from discoalign.models.loader import load_model_with_heads, load_tokenizer
from discoalign.models.tiny import build_tiny_model


def _load(name="builtin:tiny-llama", model_kw=None, add_value_head=True, **ft):
    return load_model_with_heads(
        ModelArguments(model_name_or_path=name, **(model_kw or {})),
        FinetuningArguments(**ft),
        add_value_head=add_value_head,
    )


def test_unknown_builtin_lists_the_archs():
    with pytest.raises(
        ConfigError,
        match=r"builtin:tiny-mamba.*builtin:tiny-llama, builtin:tiny-qwen2, builtin:tiny-qwen3, builtin:tiny-gpt2",
    ):
        _load("builtin:tiny-mamba")
    with pytest.raises(ConfigError, match="model_name_or_path"):
        load_tokenizer(ModelArguments(model_name_or_path="builtin:gpt2"))


def test_builtin_equals_the_saved_tiny_model(tiny_dirs):
    built, tok = _load("builtin:tiny-gpt2")
    loaded, tok2 = _load(tiny_dirs["gpt2"])
    a, b = built.backbone.state_dict(), loaded.backbone.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert tok("bright calm")["input_ids"] == tok2("bright calm")["input_ids"]
    assert built.heads_config["base_model_name_or_path"] == "builtin:tiny-gpt2"


def test_hub_name_offline_is_a_clear_error():
    with pytest.raises(CheckpointError, match=r"model_name_or_path: no-such-org/no-such-model.*cache"):
        _load("no-such-org/no-such-model")


def test_file_instead_of_dir(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"weights\.bin.*is a file"):
        _load(str(path))


def test_trust_remote_code_only_when_set(tiny_dirs, monkeypatch):
    from transformers import AutoModelForCausalLM

    seen = []
    original = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        return original(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    _load(tiny_dirs["llama"])
    _load(tiny_dirs["llama"], model_kw={"trust_remote_code": True})
    assert seen == [None, True]


@pytest.mark.parametrize("name", ["builtin:tiny-qwen2", "dir"])
def test_flash_attention_falls_back_to_sdpa_with_one_warning(tiny_dirs, caplog, name):
    name = tiny_dirs["qwen2"] if name == "dir" else name
    loader_module._warned_attn.clear()
    with caplog.at_level(logging.WARNING, logger="discoalign"):
        model, _ = _load(name, model_kw={"attn_implementation": "flash_attention_2"})
        _load(name, model_kw={"attn_implementation": "flash_attention_2"})
    assert model.config._attn_implementation == "sdpa"
    warnings = [r for r in caplog.records if "flash_attention_2" in r.getMessage() and "falling back" in r.getMessage()]
    assert len(warnings) == 1


def test_eager_is_honoured_and_a_typo_is_a_config_error(tiny_dirs):
    model, _ = _load(tiny_dirs["llama"], model_kw={"attn_implementation": "eager"})
    assert model.config._attn_implementation == "eager"
    with pytest.raises(ConfigError, match=r"attn_implementation: sdpaa"):
        _load("builtin:tiny-llama", model_kw={"attn_implementation": "sdpaa"})


def test_heads_follow_the_flags_and_settings():
    model, _ = _load(add_disco_head=True, head_dropout=0.1, head_init_std=0.02)
    assert model.value_head is not None and model.variance_head is not None and model.beta_head is None
    assert isinstance(model.value_head.dropout, torch.nn.Dropout) and model.value_head.dropout.p == 0.1
    assert model.value_head.summary.bias.abs().sum() == 0  # normal(0, std) init zeroes the bias
    assert 0.005 < model.value_head.summary.weight.std() < 0.05
    dpo, _ = _load(add_value_head=False, stage="dpo", add_beta_head=True, beta_head_epsilon=0.25)
    assert dpo.value_head is None and dpo.beta_head.epsilon == 0.25
    assert dpo.heads_config["beta_head_epsilon"] == 0.25 and dpo.heads_config["hidden_size"] == 64
    with pytest.raises(ConfigError, match="beta_head_epsilon"):
        _load(add_value_head=False, stage="dpo", add_beta_head=True, beta_head_epsilon=1.5)


def test_unused_heads_change_no_random_draw():
    """Decoupling: adding the variance/beta heads must not move the RNG, so all else stays bit-identical."""
    results = []
    for extra in ({}, {"add_disco_head": True}, {"add_disco_head": True, "add_beta_head": True, "stage": "dpo"}):
        torch.manual_seed(7)
        model, _ = _load(finetuning_type="lora", lora_rank=2, **extra)
        results.append(
            (
                {n: p.clone() for n, p in model.named_parameters() if "lora_" in n or "value_head" in n},
                torch.random.get_rng_state(),
            )
        )
    for params, state in results[1:]:
        assert torch.equal(state, results[0][1])
        assert params.keys() == results[0][0].keys()
        assert all(torch.equal(params[k], results[0][0][k]) for k in params)


def test_loading_a_checkpoint_leaves_the_global_rng_alone(tmp_path):
    model, tok = _load()
    path = save_checkpoint(model, str(tmp_path / "rm"), tok)
    torch.manual_seed(3)
    fresh_draw = (_load(), torch.rand(3))[1]
    torch.manual_seed(3)
    reload_draw = (_load(path), torch.rand(3))[1]
    assert torch.equal(fresh_draw, reload_draw)


def test_tokenizer_of_an_adapter_dir_without_one_comes_from_its_base(tmp_path):
    model, _ = _load(finetuning_type="lora", lora_rank=2)
    path = save_checkpoint(model, str(tmp_path / "adapter"))  # no tokenizer saved
    tok = load_tokenizer(ModelArguments(model_name_or_path=path))
    assert tok.eos_token == "<|im_end|>" and len(tok) == build_tiny_model("llama").config.vocab_size


def test_tokenizer_without_pad_gets_eos(tmp_path):
    from discoalign.models.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    tok.pad_token = None
    tok.save_pretrained(str(tmp_path))
    loaded = load_tokenizer(ModelArguments(model_name_or_path=str(tmp_path)))
    assert loaded.pad_token == loaded.eos_token == "<|im_end|>"
