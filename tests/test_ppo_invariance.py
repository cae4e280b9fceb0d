"""Decoupling, bit for bit: a head that exists but is unused changes no number of a PPO run.

* `add_beta_head: true` with `use_dynamic_beta: false`: the beta head is created without drawing random numbers
  and never run, so every logged statistic and every weight equal the run without it (full and LoRA).
* a Disco reward model with `disco_risk_coef: 0`: the reward is its mean, so the run equals the one against the
  scalar reward model that holds the same weights without the variance head.
"""

from __future__ import annotations

import os

import pytest
import torch
from helpers import log_history
from safetensors.torch import load_file

from discoalign.config import build_config
from discoalign.config.schema import FinetuningArguments, ModelArguments
from discoalign.models.checkpoint import save_checkpoint
from discoalign.models.loader import load_model_with_heads
from discoalign.train.tuner import run_exp

# Statistics that only the run with the extra head can log, and timings.
ONLY_WITH_HEAD = {"reward/variance", "reward/mean_variance_corr"}
TIMINGS = ("runtime", "per_second")


@pytest.fixture(scope="module")
def reward_models(tmp_path_factory) -> dict[str, str]:
    """The same random reward model saved with and without a (non-trivial) variance head."""
    root = tmp_path_factory.mktemp("ppo-inv-rms")
    torch.manual_seed(3)
    disco, tok = load_model_with_heads(
        ModelArguments(model_name_or_path="builtin:tiny-qwen3"), FinetuningArguments(add_disco_head=True),
        add_value_head=True,
    )  # fmt: skip
    with torch.no_grad():
        disco.variance_head.summary.weight.normal_(0, 0.2)
    disco_dir = save_checkpoint(disco, str(root / "disco"), tok)
    disco.variance_head = None
    return {"disco": disco_dir, "scalar": save_checkpoint(disco, str(root / "scalar"), tok)}


def _run(output_dir, reward_model: str, **overrides) -> tuple[list[dict], dict[str, torch.Tensor]]:
    raw = {
        "stage": "ppo", "model_name_or_path": "builtin:tiny-qwen3", "reward_model": reward_model,
        "dataset": "builtin:synthetic", "synthetic_num_pairs": 32, "max_new_tokens": 5,
        "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2, "ppo_buffer_size": 2, "ppo_epochs": 2,
        "max_steps": 3, "logging_steps": 1, "learning_rate": 2.0e-3, "output_dir": str(output_dir),
        "save_strategy": "no", "disable_tqdm": True, "seed": 0, "do_train": True, "head_dropout": 0.1,
        "plot_loss": False,
    }  # fmt: skip
    raw.update(overrides)
    run_exp(build_config(raw))
    logs = log_history(output_dir)
    weights = {}
    for name in ("model.safetensors", "adapter_model.safetensors", "heads.safetensors"):
        path = os.path.join(output_dir, name)
        if os.path.isfile(path):
            weights.update({f"{name}:{k}": v for k, v in load_file(path).items()})
    return logs, weights


def _assert_same_numbers(logs_a, weights_a, logs_b, weights_b, ignore=()):
    assert len(logs_a) == len(logs_b)
    for a, b in zip(logs_a, logs_b):
        keys = {k for k in a.keys() | b.keys() if k not in ignore and not any(t in k for t in TIMINGS)}
        for key in keys:
            assert a[key] == b[key], (key, a.get(key), b.get(key))
    shared = weights_a.keys() & weights_b.keys()
    assert shared
    for key in shared:
        assert torch.equal(weights_a[key], weights_b[key]), key


@pytest.mark.parametrize("finetuning_type", ["full", "lora"])
def test_unused_beta_head_changes_nothing(tmp_path, reward_models, finetuning_type):
    extra = {"finetuning_type": finetuning_type, "lora_rank": 4} if finetuning_type == "lora" else {}
    logs, weights = _run(tmp_path / "plain", reward_models["scalar"], **extra)
    logs_head, weights_head = _run(tmp_path / "head", reward_models["scalar"], add_beta_head=True, **extra)
    assert any(k.startswith("heads.safetensors:beta_head") for k in weights_head)  # it exists and is saved
    _assert_same_numbers(logs, weights, logs_head, weights_head)
    assert torch.equal(weights_head["heads.safetensors:beta_head.summary.weight"], torch.zeros(1, 64))


def test_disco_reward_model_with_zero_risk_equals_its_mean(tmp_path, reward_models):
    logs, weights = _run(tmp_path / "scalar", reward_models["scalar"])
    logs_disco, weights_disco = _run(tmp_path / "disco", reward_models["disco"], disco_risk_coef=0.0)
    assert "reward/variance" in logs_disco[0] and "reward/variance" not in logs[0]
    _assert_same_numbers(logs, weights, logs_disco, weights_disco, ignore=ONLY_WITH_HEAD)


def test_the_risk_coefficient_does_change_the_run(tmp_path, reward_models):
    logs, _ = _run(tmp_path / "zero", reward_models["disco"], max_steps=1)
    logs_risk, _ = _run(tmp_path / "risk", reward_models["disco"], max_steps=1, disco_risk_coef=1.0)
    assert logs_risk[0]["reward/mean"] == logs[0]["reward/mean"]  # same first rollout...
    expected = logs[0]["reward/mean"] - logs_risk[0]["objective/scores"]  # ...scored lower by mean(sqrt(var))
    assert expected > 0 and logs[0]["objective/scores"] == logs[0]["reward/mean"]
