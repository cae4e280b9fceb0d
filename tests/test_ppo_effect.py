"""Effect: on builtin:synthetic, where the true reward is known, PPO against a reward model trained on the task
raises the policy's mean true reward over the starting policy within a small CPU budget.

The same pipeline as `discoalign demo --parts ppo`: a BT reward model (~95 steps), a supervised warm-up of the
tiny policy on the task's responses (60 steps; the starting policy writes adjective lists with no preference,
true reward near 0), then 20 PPO steps of 32 prompts. The true reward is measured on held-out prompts
(`eval_on_start` before training, `do_eval` after), with the same seeded sampling both times.
"""

from __future__ import annotations

import math

import pytest

from discoalign.cli.demo.ppo import ensure_reward_model, ensure_warm_policy, ppo_demo_config
from discoalign.config import build_config
from discoalign.train.tuner import run_exp


@pytest.mark.slow
def test_ppo_raises_the_true_reward(tmp_path):
    reward_model = ensure_reward_model(str(tmp_path / "rm_bt"), disco=False)
    policy = ensure_warm_policy(str(tmp_path / "policy_warmup"))
    results = run_exp(build_config(ppo_demo_config(str(tmp_path / "ppo"), policy, reward_model)))
    before = results["eval_start"]["eval_objective/true_reward"]
    after = results["eval"]["eval_objective/true_reward"]
    kl = results["eval"]["eval_objective/kl"]
    print(f"true reward {before:.3f} -> {after:.3f}, KL {kl:.2f}")
    assert abs(before) < 0.15  # the warmed-up policy has no preference between good and bad words
    assert after - before > 0.2, (before, after)
    assert 0 < kl < 50 and math.isfinite(kl)
    assert results["eval"]["eval_response/eos_fraction"] > 0.8  # it still writes well-formed responses
