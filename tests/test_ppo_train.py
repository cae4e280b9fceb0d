"""Stage `ppo` end to end on the tiny model: outputs, metrics, the reference, reward shaping, the beta head as a
KL controller, LoRA, the real alpaca prompts, and resuming a run where it stopped."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from helpers import log_history, rl_config, train_logs
from safetensors.torch import load_file

from discoalign.config.schema import FinetuningArguments, ModelArguments
from discoalign.data.prompts import prompt_rows
from discoalign.errors import ConfigError
from discoalign.models.checkpoint import save_checkpoint
from discoalign.models.loader import load_model_with_heads
from discoalign.train.ppo.workflow import build_ppo_trainer
from discoalign.train.tuner import run_exp


@pytest.fixture(scope="module")
def reward_models(tmp_path_factory) -> dict[str, str]:
    """A scalar and a Disco tiny reward model with random heads (variance varying across inputs)."""
    root = tmp_path_factory.mktemp("ppo-rms")
    out = {}
    for name, disco in (("scalar", False), ("disco", True)):
        torch.manual_seed(1)
        model, tok = load_model_with_heads(
            ModelArguments(model_name_or_path="builtin:tiny-qwen3"), FinetuningArguments(add_disco_head=disco),
            add_value_head=True,
        )  # fmt: skip
        if disco:
            with torch.no_grad():
                model.variance_head.summary.weight.normal_(0, 0.2)
        out[name] = save_checkpoint(model, str(root / name), tok)
    return out


def ppo_config(output_dir, reward_model: str, **overrides):
    ppo = {"synthetic_num_pairs": 48, "max_new_tokens": 6, "ppo_buffer_size": 2, "ppo_epochs": 2}
    return rl_config("ppo", output_dir, ppo, reward_model=reward_model, **overrides)


def test_full_run_writes_checkpoint_metrics_samples_and_plots(tmp_path, reward_models, monkeypatch):
    import discoalign.train.base_trainer as base_trainer

    plotted, plot = {}, base_trainer.plot_history

    def recording(history, keys, path, title):  # which of a plot's keys have points
        plotted[os.path.basename(path)] = {k for k in keys if any(k in entry for entry in history)}
        return plot(history, keys, path, title)

    monkeypatch.setattr(base_trainer, "plot_history", recording)
    out = tmp_path / "ppo"
    results = run_exp(ppo_config(out, reward_models["disco"], eval_dataset="builtin:synthetic", do_eval=True))
    # The final evaluation is in trainer_state.json (its last entry, at the last step) and in the reward plot.
    final = log_history(out)[-1]
    assert final["step"] == 2 and final["eval_objective/scores"] == results["eval"]["eval_objective/scores"]
    assert "eval_objective/scores" in plotted["reward.png"]
    logs = train_logs(out)
    assert [e["step"] for e in logs] == [1, 2]
    for key in ("objective/kl", "objective/entropy", "objective/scores", "objective/true_reward", "policy/clipfrac",
                "policy/approxkl", "val/vf_loss", "val/clipfrac", "response/length", "beta/mean", "reward/mean",
                "reward/variance", "reward/mean_variance_corr", "loss/policy", "learning_rate"):  # fmt: skip
        assert key in logs[0], key
    # The first rollout comes before any update: policy == reference (a frozen copy), so the KL is exactly 0.
    assert logs[0]["objective/kl"] == 0.0
    assert logs[0]["beta/mean"] == pytest.approx(0.1)
    assert 1 <= logs[0]["response/length"] <= 6
    assert "eval_objective/scores" in results["eval"] and "eval_objective/true_reward" in results["eval"]

    heads = load_file(str(out / "heads.safetensors"))
    assert set(heads) == {"value_head.summary.weight", "value_head.summary.bias"}
    assert (out / "model.safetensors").is_file() and (out / "heads_config.json").is_file()
    assert (out / "discoalign_config.yaml").is_file() and (out / "train_results.json").is_file()
    assert (out / "plots" / "reward.png").is_file() and (out / "plots" / "kl.png").is_file()
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [1, 1, 2, 2]
    assert {"prompt", "response", "score", "variance", "kl", "true_reward"} <= set(samples[0])
    # The saved policy reloads with its critic.
    policy, _ = load_model_with_heads(
        ModelArguments(model_name_or_path=str(out)), FinetuningArguments(), add_value_head=True
    )
    torch.testing.assert_close(policy.value_head.summary.weight, heads["value_head.summary.weight"])


def test_lora_policy_saves_an_adapter_and_starts_at_zero_kl(tmp_path, reward_models):
    out = tmp_path / "ppo-lora"
    run_exp(ppo_config(out, reward_models["scalar"], finetuning_type="lora", lora_rank=4, learning_rate=5e-3))
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert not (out / "model.safetensors").exists()
    logs = train_logs(out)
    assert abs(logs[0]["objective/kl"]) < 1e-6  # LoRA B = 0 at init: the adapters change nothing yet
    assert "reward/variance" not in logs[0]


def test_reference_from_ref_model_name_or_path(tmp_path, reward_models, tiny_dirs):
    # tiny_dirs["qwen3"] holds the weights builtin:tiny-qwen3 builds: the reference equals the starting policy.
    cfg = ppo_config(tmp_path, reward_models["scalar"], ref_model_name_or_path=tiny_dirs["qwen3"])
    trainer, bundle = build_ppo_trainer(cfg)
    assert trainer.ref_model is not None and trainer.ref_model.value_head is None
    rollout = trainer.make_rollout(prompt_rows(bundle.train, list(range(4))))
    torch.testing.assert_close(rollout.kl, torch.zeros_like(rollout.kl), atol=1e-5, rtol=0)


def test_rollout_scores_follow_risk_clip_and_missing_eos_penalty(tmp_path, reward_models):
    cfg = ppo_config(tmp_path, reward_models["disco"], max_new_tokens=2, disco_risk_coef=0.5, reward_clip=0.3,
                     missing_eos_penalty=1.0)  # fmt: skip
    trainer, bundle = build_ppo_trainer(cfg)
    torch.manual_seed(0)
    rollout = trainer.make_rollout(prompt_rows(bundle.train, list(range(8))))
    assert not rollout.ended.all()  # two tokens are too few for most responses
    expected = (rollout.reward_mean - 0.5 * rollout.reward_variance.sqrt()).clamp(-0.3, 0.3) - (~rollout.ended).float()
    torch.testing.assert_close(rollout.scores, expected)
    assert torch.equal(rollout.kl, torch.zeros_like(rollout.kl))
    # the score sits on the last response token of each row, next to the (zero) KL penalty
    last = rollout.response_mask.sum(1).long() - 1
    torch.testing.assert_close(rollout.rewards[torch.arange(8), last], rollout.scores)


def test_beta_head_lowers_kl_coefficient_below_the_target(tmp_path, reward_models):
    out = tmp_path / "ppo-beta"
    cfg = ppo_config(out, reward_models["scalar"], add_beta_head=True, use_dynamic_beta=True, target_kl=100.0,
                     kl_estimator="k3", max_steps=3)  # fmt: skip
    run_exp(cfg)
    logs = train_logs(out)
    assert logs[0]["beta/mean"] == pytest.approx(0.1)  # s(x) = 1 before the head learns
    assert logs[-1]["beta/max"] < 0.1  # KL far below the target for every prompt: every s(x) went down
    assert "beta/loss" in logs[-1]
    heads = load_file(str(out / "heads.safetensors"))
    assert heads["beta_head.summary.weight"].abs().sum() > 0


@pytest.mark.parametrize("observed_kl, direction", [(5.0, 1), (0.5, -1)])
def test_beta_head_update_follows_the_kl_error(tmp_path, reward_models, observed_kl, direction):
    """One PPO update on a rollout whose per-response KL is above (below) target_kl = 2 raises (lowers) s(x)."""
    cfg = ppo_config(tmp_path, reward_models["scalar"], add_beta_head=True, use_dynamic_beta=True, target_kl=2.0,
                     ppo_epochs=1)  # fmt: skip
    trainer, bundle = build_ppo_trainer(cfg)
    trainer.create_optimizer()
    rollout = trainer.make_rollout(prompt_rows(bundle.train, list(range(16))))
    rollout.kl = rollout.response_mask * observed_kl / rollout.response_mask.sum(1, keepdim=True)
    beta_head = trainer.model.beta_head
    before = beta_head(rollout.ref_prompt_hidden).detach()
    assert torch.equal(before, torch.ones(16))
    trainer.optimize(trainer.model, rollout)
    after = beta_head(rollout.ref_prompt_hidden).detach()
    assert (direction * (after - before) > 0).all()


def test_alpaca_prompts(tmp_path, reward_models, shared_data):
    out = tmp_path / "ppo-alpaca"
    cfg = ppo_config(out, reward_models["scalar"], dataset=str(shared_data / "alpaca_en_demo.json"), max_samples=16,
                     cutoff_len=128, max_steps=1, ppo_epochs=1)  # fmt: skip
    results = run_exp(cfg)
    assert results["train"]["train_loss"] == pytest.approx(results["train"]["train_loss"])  # finite
    assert "objective/true_reward" not in train_logs(out)[0]  # only builtin:synthetic has a known reward


USER = {"role": "user", "content": "Describe a calm river."}
PROMPT_ROWS = {
    "prompt string": {"prompt": "Describe a calm river."},
    "prompt messages": {"prompt": [{"role": "system", "content": "Be brief."}, USER]},
    "alpaca": {"instruction": "Describe a river.", "input": "calm", "output": "ignored"},
    "messages": {"messages": [USER, {"role": "assistant", "content": "ignored"}]},
    "sharegpt": {"conversations": [{"from": "human", "value": USER["content"]}, {"from": "gpt", "value": "ignored"}]},
}


@pytest.mark.parametrize("layout", list(PROMPT_ROWS))
def test_every_prompt_only_format_rolls_out(tmp_path, reward_models, layout):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(PROMPT_ROWS[layout]) for _ in range(4)))
    trainer, bundle = build_ppo_trainer(ppo_config(tmp_path, reward_models["scalar"], dataset=str(path)))
    rollout = trainer.make_rollout(prompt_rows(bundle.train, [0, 1]))
    prompts, responses = trainer.decode_rollout(rollout)
    assert "river" in prompts[0] and "ignored" not in prompts[0]
    assert prompts[0].rstrip().endswith("assistant")  # the chat template's generation prompt
    assert rollout.response_mask.sum() > 0 and len(responses) == 2


def test_too_few_prompts_for_one_rollout(tmp_path, reward_models):
    with pytest.raises(ConfigError, match="fewer than one PPO rollout needs") as info:
        run_exp(ppo_config(tmp_path, reward_models["scalar"], max_samples=10))
    assert "per_device_train_batch_size (4)" in str(info.value) and "ppo_buffer_size (2)" in str(info.value)


def test_resume_ends_where_an_uninterrupted_run_ends(tmp_path, reward_models):
    full = tmp_path / "full"
    common = dict(max_steps=3, save_strategy="steps", save_steps=1, ppo_epochs=1)
    run_exp(ppo_config(full, reward_models["scalar"], **common))
    resumed = tmp_path / "resumed"
    run_exp(ppo_config(resumed, reward_models["scalar"], resume_from_checkpoint=str(full / "checkpoint-1"), **common))
    for name in ("model.safetensors", "heads.safetensors"):
        a, b = load_file(str(full / name)), load_file(str(resumed / name))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    last_full, last_resumed = train_logs(full)[-1], train_logs(resumed)[-1]
    assert last_full["step"] == last_resumed["step"] == 3
    for key, value in last_full.items():
        if isinstance(value, float) and not math.isnan(value):
            assert last_resumed[key] == value, key


def test_train_samples_per_second_counts_rolled_out_prompts(tmp_path, reward_models):
    """A PPO step rolls out 4 x 2 x 2 = 16 prompts (batch x accumulation x ppo_buffer_size), not one mini-batch."""
    metrics = run_exp(ppo_config(tmp_path, reward_models["scalar"], max_steps=2, ppo_epochs=1))["train"]
    assert metrics["train_samples_per_second"] == pytest.approx(2 * 16 / metrics["train_runtime"], rel=0.01)
