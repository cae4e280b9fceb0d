"""Stage `grpo` end to end on the tiny model: metrics finite, GRPO / RLOO / reward functions / Disco-aware
advantages, `beta: 0` without a reference, the groups of a rollout, and config errors before any model loads."""

from __future__ import annotations

import math

import grpo_reward_funcs
import pytest
import torch
from helpers import rl_config, train_logs

from discoalign.config import build_config
from discoalign.config.schema import FinetuningArguments, ModelArguments
from discoalign.data.prompts import prompt_rows
from discoalign.errors import ConfigError
from discoalign.models.checkpoint import save_checkpoint
from discoalign.models.loader import load_model_with_heads
from discoalign.train.grpo.workflow import build_grpo_trainer
from discoalign.train.tuner import WORKFLOWS, run_exp


@pytest.fixture(scope="module")
def disco_rm(tmp_path_factory) -> str:
    """A tiny Disco reward model with random heads (variance varying across inputs)."""
    torch.manual_seed(1)
    model, tok = load_model_with_heads(
        ModelArguments(model_name_or_path="builtin:tiny-qwen3"), FinetuningArguments(add_disco_head=True),
        add_value_head=True,
    )  # fmt: skip
    with torch.no_grad():
        model.variance_head.summary.weight.normal_(0, 0.2)
    return save_checkpoint(model, str(tmp_path_factory.mktemp("grpo-rm") / "disco"), tok)


def grpo_config(output_dir, **overrides):
    grpo = {"synthetic_num_pairs": 32, "max_new_tokens": 5, "num_generations": 4, "num_iterations": 2}
    return rl_config("grpo", output_dir, grpo, **overrides)


def test_registered():
    assert "grpo" in WORKFLOWS


def test_grpo_with_disco_rm_and_reward_func(tmp_path, disco_rm):
    grpo_reward_funcs.CALLS.clear()
    cfg = grpo_config(
        tmp_path / "g", reward_model=disco_rm, reward_funcs=["grpo_reward_funcs:length_reward"],
        reward_weights=[1.0, 0.5], disco_risk_coef=0.5, uncertainty_shrinkage=1.0, pref_beta=0.05,
    )  # fmt: skip
    results = run_exp(cfg)
    logs = train_logs(tmp_path / "g")
    assert len(logs) == 2
    for entry in logs:
        for key in ("loss", "objective/kl", "objective/scores", "objective/true_reward", "reward_std", "kl",
                    "rewards/reward_model/mean", "rewards/length_reward/mean", "advantage/weight_mean",
                    "clip_ratio/region_mean", "grad_norm"):  # fmt: skip
            assert math.isfinite(entry[key]), key
        assert 0 < entry["advantage/weight_mean"] < 1  # the Disco variance down-weights
    assert math.isfinite(results["train"]["train_loss"])
    # the reward function saw every completion, with TRL's conversational layout and the rows' columns
    call = grpo_reward_funcs.CALLS[0]
    assert len(call["prompts"]) == len(call["completions"]) == 8 == len(call["topic"]) == len(call["completion_ids"])
    assert call["prompts"][0][0]["role"] == "user" and "Topic:" in call["prompts"][0][0]["content"]
    assert call["completions"][0][0]["role"] == "assistant"
    assert call["prompts"][0] == call["prompts"][3] != call["prompts"][4]  # groups of 4 consecutive completions
    assert call["topic"][0] in call["prompts"][0][0]["content"]
    assert call["trainer_state"] is not None


def test_rloo_and_beta_zero_without_reference(tmp_path):
    cfg = grpo_config(
        tmp_path / "r", reward_funcs="grpo_reward_funcs:length_reward,grpo_reward_funcs:topic_reward",
        advantage_estimator="rloo", pref_beta=0.0, scale_rewards="none", loss_type="dr_grpo",
    )  # fmt: skip
    assert cfg.finetuning.grpo_loss_type == "dr_grpo"  # TRL's `loss_type` under stage grpo
    trainer, _ = build_grpo_trainer(cfg)
    assert trainer.ref_model is None and not trainer.uses_reference and trainer.reward_model is None
    assert trainer.rollout_batch_size == 2  # 8 completions per step = 2 prompts x 4
    rows = prompt_rows(trainer.train_dataset, [0, 1])
    rollout = trainer.make_rollout(rows)
    assert len(rollout) == 8 and rollout.ref_logprobs is None and rollout.values is None
    assert torch.equal(rollout.query_ids[0], rollout.query_ids[3]) and rollout.advantages.shape == (8,)
    # RLOO, unscaled: each advantage is the reward minus the mean of the other three of its group
    grouped = rollout.scores.view(2, 4)
    expected = grouped - (grouped.sum(1, keepdim=True) - grouped) / 3
    torch.testing.assert_close(rollout.advantages, expected.reshape(-1))
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2 and "objective/kl" not in logs[-1] and math.isfinite(logs[-1]["loss"])
    assert logs[-1]["rewards/topic_reward/mean"] in (0.0, 0.25, 0.5, 0.75, 1.0)


def test_kl_is_k1_logged_and_starts_at_zero(tmp_path, disco_rm):
    """Full fine-tuning: the reference is a frozen copy, so the first rollout's KL is 0."""
    trainer, _ = build_grpo_trainer(grpo_config(tmp_path / "k", reward_model=disco_rm, pref_beta=0.1))
    rollout = trainer.make_rollout(prompt_rows(trainer.train_dataset, [0, 1]))
    assert float(rollout.kl.abs().max()) < 1e-5
    assert trainer.ref_model is not None
    # evaluation answers every prompt once, as PPO's does (3 prompts: not a multiple of num_generations)
    metrics = trainer.evaluate_rollouts(trainer.train_dataset.select(range(3)))
    assert math.isfinite(metrics["eval_objective/scores"]) and "eval_reward_std" not in metrics
    assert trainer.make_rollout(prompt_rows(trainer.train_dataset, [0])).query_ids.shape[0] == 4


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"reward_funcs": ["no_such_module_xyz:f"]}, "module `no_such_module_xyz` cannot be imported"),
        ({"reward_funcs": ["grpo_reward_funcs:missing"]}, "has no function `missing`"),
        ({"reward_funcs": ["grpo_reward_funcs:NOT_A_FUNCTION"]}, "not callable"),
        ({"reward_funcs": ["grpo_reward_funcs"]}, "is not `module:function`"),
        ({}, "needs a reward"),
        ({"reward_funcs": ["grpo_reward_funcs:length_reward"], "num_generations": 3}, "must divide"),
        ({"reward_funcs": ["grpo_reward_funcs:length_reward"], "reward_weights": [1.0, 2.0]}, "list of 1 number"),
        ({"reward_funcs": ["grpo_reward_funcs:length_reward"], "ppo_epochs": 2}, "`ppo_epochs` applies to"),
        ({"reward_funcs": ["grpo_reward_funcs:length_reward"], "scale_rewards": "std"}, "`scale_rewards`"),
        ({"reward_funcs": ["grpo_reward_funcs:length_reward"], "uncertainty_shrinkage": 1.0}, "no `reward_model`"),
        ({"reward_funcs": ["grpo_reward_funcs:length_reward"], "epsilon_high": 0.1}, "`epsilon_high`"),
    ],
)
def test_config_errors_before_any_model_loads(tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match):
        grpo_config(tmp_path / "e", **overrides)


def test_grpo_keys_refused_elsewhere(tmp_path):
    with pytest.raises(ConfigError, match="`num_generations` applies to `stage: grpo` only"):
        build_config({"stage": "ppo", "reward_model": "x", "num_generations": 4})
    # `loss_type` stays DPO's `pref_loss` outside stage grpo
    assert build_config({"stage": "dpo", "loss_type": "ipo"}).finetuning.pref_loss == "ipo"


def test_scalar_rm_with_shrinkage_is_refused(tmp_path):
    torch.manual_seed(1)
    model, tok = load_model_with_heads(
        ModelArguments(model_name_or_path="builtin:tiny-qwen3"), FinetuningArguments(), add_value_head=True
    )
    scalar = save_checkpoint(model, str(tmp_path / "scalar"), tok)
    with pytest.raises(ConfigError, match="`uncertainty_shrinkage: 1.0` weights advantages"):
        build_grpo_trainer(grpo_config(tmp_path / "s", reward_model=scalar, uncertainty_shrinkage=1.0))


def test_lora_policy_with_a_lora_reward_adapter_on_its_base(tmp_path):
    """LoRA policy, reference = adapters off (KL 0 at the first rollout), the reward model a LoRA adapter + Disco
    heads loaded on the policy's own base (`reward_model_type: lora`), as PPO does."""
    from discoalign.models.reward_adapter import SharedBaseRewardModel

    torch.manual_seed(11)
    model, tok = load_model_with_heads(
        ModelArguments(model_name_or_path="builtin:tiny-qwen3"),
        FinetuningArguments(finetuning_type="lora", lora_rank=4, add_disco_head=True), add_value_head=True,
    )  # fmt: skip
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "variance_head" in name:
                param.normal_(0, 0.1)
    adapter = save_checkpoint(model, str(tmp_path / "rm_adapter"), tok)
    cfg = grpo_config(
        tmp_path / "l", finetuning_type="lora", lora_rank=4, reward_model=adapter, reward_model_type="lora",
        uncertainty_shrinkage=1.0, pref_beta=0.05,
    )  # fmt: skip
    trainer, _ = build_grpo_trainer(cfg)
    assert isinstance(trainer.accelerator.unwrap_model(trainer.reward_model), SharedBaseRewardModel)
    assert trainer.ref_model is None and trainer.uses_reference  # the base with adapters disabled
    rollout = trainer.make_rollout(prompt_rows(trainer.train_dataset, [0, 1]))
    assert float(rollout.kl.abs().max()) < 1e-5 and rollout.reward_variance is not None
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2 and all(math.isfinite(e["loss"]) and math.isfinite(e["objective/kl"]) for e in logs)
