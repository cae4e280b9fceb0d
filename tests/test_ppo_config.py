"""The PPO keys of a run's config: accepted with `stage: ppo`, checked before any model loads, each mistake a
ConfigError naming the key."""

from __future__ import annotations

import logging

import pytest

from discoalign.config import build_config
from discoalign.errors import ConfigError

PPO = {"stage": "ppo", "reward_model": "saves/rm_bt", "dataset": "builtin:synthetic"}


def test_a_ppo_config_builds_with_the_documented_defaults(tmp_path):
    cfg = build_config({**PPO, "output_dir": str(tmp_path)})
    ft = cfg.finetuning
    assert ft.stage == "ppo" and ft.reward_model == "saves/rm_bt" and ft.reward_model_type == "full"
    assert (ft.ppo_epochs, ft.ppo_buffer_size, ft.gamma, ft.lam) == (4, 1, 1.0, 0.95)
    assert (ft.cliprange, ft.cliprange_value, ft.vf_coef) == (0.2, 0.2, 0.1)
    assert (ft.temperature, ft.top_p, ft.top_k, ft.max_new_tokens) == (1.0, 1.0, 0, 64)
    assert (ft.disco_risk_coef, ft.missing_eos_penalty, ft.reward_clip, ft.whiten_rewards) == (0.0, None, None, False)
    assert cfg.resolved["reward_model"] == "saves/rm_bt"


def test_ppo_without_reward_model():
    with pytest.raises(ConfigError, match="`stage: ppo` needs `reward_model`"):
        build_config({"stage": "ppo", "dataset": "builtin:synthetic"})


@pytest.mark.parametrize(
    "keys", [{"add_disco_head": True}, {"disco_pref": True, "add_disco_head": True}, {"disco_pref": True}]
)
def test_policy_variance_head_is_refused_in_ppo(keys):
    with pytest.raises(ConfigError, match="cannot be used with `stage: ppo`") as info:
        build_config({**PPO, **keys})
    assert "disco_risk_coef" in str(info.value)
    for key in keys:
        assert f"`{key}`" in str(info.value)


@pytest.mark.parametrize(
    "key, value",
    [("reward_model", "saves/rm"), ("disco_risk_coef", 0.5), ("max_new_tokens", 8), ("ppo_epochs", 2)],
)
def test_ppo_keys_in_other_stages(key, value):
    for stage in ("rm", "dpo"):
        with pytest.raises(ConfigError, match=f"`{key}` applies to `stage: ppo` only, not `stage: {stage}`"):
            build_config({"stage": stage, key: value})


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("max_new_tokens", 0, "positive integer"),
        ("ppo_epochs", 0, "positive integer"),
        ("ppo_buffer_size", -1, "positive integer"),
        ("temperature", 0.0, "positive"),
        ("top_p", 1.5, "(0, 1]"),
        ("top_p", 0.0, "(0, 1]"),
        ("top_k", -1, "0 (disabled)"),
        ("gamma", 1.1, "[0, 1]"),
        ("lam", -0.1, "[0, 1]"),
        ("cliprange", 0.0, "positive"),
        ("cliprange_value", -1.0, "positive"),
        ("target_kl", 0.0, "positive"),
        ("vf_coef", -0.5, "non-negative"),
        ("disco_risk_coef", -1.0, "non-negative"),
        ("missing_eos_penalty", -1.0, "non-negative"),
        ("reward_clip", 0.0, "positive"),
    ],
)
def test_ppo_values_out_of_range(key, value, words):
    with pytest.raises(ConfigError) as info:
        build_config({**PPO, key: value})
    assert f"`{key}` is {value}" in str(info.value) and words in str(info.value)


def test_bad_types_and_choices_name_the_key():
    with pytest.raises(ConfigError, match="`reward_model_type`.*'full', 'lora'"):
        build_config({**PPO, "reward_model_type": "api"})
    with pytest.raises(ConfigError, match="`kl_estimator`"):
        build_config({**PPO, "kl_estimator": "k2"})
    with pytest.raises(ConfigError, match="`ppo_epochs`.*an integer"):
        build_config({**PPO, "ppo_epochs": 1.5})


def test_typo_suggests_the_ppo_key():
    with pytest.raises(ConfigError, match="Did you mean `ppo_epochs`"):
        build_config({**PPO, "ppo_epoch": 2})


def test_beta_head_is_allowed_in_ppo_and_target_kl_without_dynamic_beta_is_noted(caplog):
    cfg = build_config({**PPO, "add_beta_head": True, "use_dynamic_beta": True, "target_kl": 2.0})
    assert cfg.finetuning.use_dynamic_beta
    with caplog.at_level(logging.WARNING):
        build_config({**PPO, "target_kl": 2.0})
    assert any("`target_kl` is set but `use_dynamic_beta` is false" in r.message for r in caplog.records)
    with pytest.raises(ConfigError, match="use_dynamic_beta"):
        build_config({**PPO, "use_dynamic_beta": True})
