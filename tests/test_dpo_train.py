"""Stage `dpo` end to end: outputs, metrics, checkpoint round trip of the heads, pref_ftx, resume, bad input."""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import GRID_CELL, dpo_config, train_logs
from safetensors.torch import load_file

from discoalign.config.schema import FinetuningArguments, ModelArguments
from discoalign.errors import ConfigError
from discoalign.models.loader import load_model_with_heads
from discoalign.train.dpo import run_dpo
from discoalign.train.dpo.workflow import build_dpo_trainer

RUN = {
    "synthetic_num_pairs": 12,
    "max_steps": 3,
    "per_device_train_batch_size": 2,
    "per_device_eval_batch_size": 4,
    "learning_rate": 1e-2,
    "logging_steps": 1,
}


def config(tmp_path, **overrides):
    return dpo_config(tmp_path, RUN, **overrides)


@pytest.mark.parametrize("finetuning_type", ["full", "lora"])
def test_run_writes_checkpoint_metrics_plots_and_heads_reload(tmp_path, finetuning_type):
    cfg = config(tmp_path, eval_dataset="builtin:synthetic", do_eval=True, finetuning_type=finetuning_type,
                 lora_rank=4, **GRID_CELL)  # fmt: skip
    results = run_dpo(cfg)

    train_keys = set().union(*train_logs(tmp_path))
    for key in (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "beta/mean",
        "beta/min",
        "beta/max",
        "variance/chosen",
        "variance/rejected",
    ):
        assert key in train_keys, key  # fmt: skip
    assert "beta/mean_when_correct" in train_keys or "beta/mean_when_wrong" in train_keys
    eval_metrics = json.loads((tmp_path / "eval_results.json").read_text())
    assert eval_metrics == pytest.approx(results["eval"])
    for key in (
        "eval_loss",
        "eval_rewards/accuracies",
        "eval_true_pref_accuracy",
        "eval_true_pref_logp_accuracy",
        "eval_beta_clean",
        "eval_beta_noisy",
        "eval_variance_clean",
        "eval_variance_noisy",
    ):
        assert key in eval_metrics, key  # fmt: skip
    assert 0.0 <= eval_metrics["eval_true_pref_accuracy"] <= 1.0
    for plot in ("loss.png", "rewards_accuracy.png", "rewards_margins.png", "beta.png", "variance.png"):
        assert (tmp_path / "plots" / plot).stat().st_size > 0, plot
    assert (tmp_path / "discoalign_config.yaml").is_file()

    heads = load_file(str(tmp_path / "heads.safetensors"))
    assert {"beta_head.summary.weight", "variance_head.summary.weight"} <= set(heads)
    assert heads["beta_head.summary.weight"].abs().sum() > 0  # it trained
    reloaded, _ = load_model_with_heads(
        ModelArguments(model_name_or_path=str(tmp_path)),
        FinetuningArguments(stage="dpo", finetuning_type=finetuning_type, add_disco_head=True, add_beta_head=True),
        add_value_head=False,
    )
    assert torch.equal(reloaded.beta_head.summary.weight, heads["beta_head.summary.weight"])
    assert torch.equal(reloaded.variance_head.summary.bias, heads["variance_head.summary.bias"])
    assert reloaded.is_peft == (finetuning_type == "lora")


def test_unused_heads_are_saved_too(tmp_path):
    run_dpo(config(tmp_path, add_disco_head=True, add_beta_head=True))
    heads = load_file(str(tmp_path / "heads.safetensors"))
    assert {"beta_head.summary.weight", "variance_head.summary.weight"} <= set(heads)
    config_json = json.loads((tmp_path / "heads_config.json").read_text())
    assert config_json["beta_head"] and config_json["variance_head"]


def test_pref_ftx_adds_the_chosen_token_nll_by_hand(tmp_path):
    def step0(**overrides):
        trainer, _ = build_dpo_trainer(config(tmp_path, **overrides))
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
        with torch.no_grad():
            loss, (pairs, _) = trainer.compute_loss(trainer.model, batch, return_outputs=True)
        lengths = (batch["labels"][:2, 1:] != -100).sum(-1)
        return loss, pairs.chosen_logps, lengths

    plain, chosen_logps, lengths = step0()
    with_ftx, _, _ = step0(pref_ftx=0.5)
    by_hand = plain + 0.5 * (-chosen_logps / lengths).mean()
    assert with_ftx.item() == pytest.approx(by_hand.item(), abs=1e-6)
    assert with_ftx.item() - plain.item() > 1.0  # tiny random model: mean token NLL ~ log(vocab)


def test_resume_restores_heads_and_ends_where_an_uninterrupted_run_ends(tmp_path):
    common = dict(max_steps=4, save_strategy="steps", save_steps=2, **GRID_CELL)
    run_dpo(config(tmp_path / "straight", **common))
    run_dpo(config(tmp_path / "resumed", **common))
    # pretend the second run was interrupted after step 2: resume it from its checkpoint
    from transformers import TrainerCallback

    class StepCounter(TrainerCallback):
        steps = 0

        def on_step_end(self, args, state, control, **kwargs):
            StepCounter.steps += 1

    resume = str(tmp_path / "resumed" / "checkpoint-2")
    run_dpo(config(tmp_path / "resumed", resume_from_checkpoint=resume, **common), callbacks=[StepCounter()])
    assert StepCounter.steps == 2  # it really resumed: only steps 3 and 4 ran
    straight = load_file(str(tmp_path / "straight" / "heads.safetensors"))
    resumed = load_file(str(tmp_path / "resumed" / "heads.safetensors"))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert straight["beta_head.summary.weight"].abs().sum() > 0
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_precomputed_full_reference_cannot_score_new_data_after_training(tmp_path):
    trainer, _ = build_dpo_trainer(config(tmp_path, precompute_ref_logps=True))
    trainer.train()
    from discoalign.data import get_dataset

    fresh = get_dataset(trainer.run_config.data, trainer.processing_class, stage="dpo").train
    with pytest.raises(ConfigError, match="precompute_ref_logps"):
        trainer.evaluate(eval_dataset=fresh)


@pytest.mark.parametrize(
    "overrides, keys",
    [
        ({"disco_pref": True}, ["disco_pref", "add_disco_head"]),
        ({"use_dynamic_beta": True}, ["use_dynamic_beta", "add_beta_head"]),
        ({"add_disco_head": True, "disco_pref": True, "pref_loss": "ipo"}, ["pref_loss", "disco_pref"]),
        ({"label_smoothing": 0.1, "pref_loss": "hinge"}, ["label_smoothing"]),
        ({"pref_beta": 0.0}, ["pref_beta"]),
        ({"add_beta_head": True, "beta_head_epsilon": 1.5}, ["beta_head_epsilon"]),
        ({"pref_los": "ipo"}, ["pref_los", "pref_loss"]),
    ],
)
def test_bad_dpo_configs_fail_before_any_model_loads(tmp_path, overrides, keys):
    with pytest.raises(ConfigError) as err:
        config(tmp_path, **overrides)
    for key in keys:
        assert f"`{key}" in str(err.value), (key, str(err.value))


def test_examples_load_and_train_one_step(tmp_path, shared_data):
    examples = sorted(p for p in os.listdir(os.path.join(os.path.dirname(__file__), "..", "examples"))
                      if p.startswith("dpo") and p.endswith(".yaml"))  # fmt: skip
    assert examples == ["dpo.yaml", "dpo_beta_dpo.yaml", "dpo_disco.yaml", "dpo_disco_dynamic_beta.yaml",
                        "dpo_dynamic_beta.yaml", "dpo_flip_rate.yaml", "dpo_lora.yaml", "dpo_orpo.yaml", "dpo_qlora.yaml", "dpo_robust.yaml",
                        "dpo_sharegpt.yaml", "dpo_simpo.yaml", "dpo_vl.yaml"]  # fmt: skip
    from discoalign.config.loader import load_config

    root = os.path.join(os.path.dirname(__file__), "..", "examples")
    for name in examples:
        overrides = {"output_dir": str(tmp_path / name), "max_steps": 1, "synthetic_num_pairs": 8,
                     "per_device_train_batch_size": 2, "per_device_eval_batch_size": 4, "do_train": True,
                     "do_eval": True, "plot_loss": False, "disable_tqdm": True}  # fmt: skip
        if name == "dpo_sharegpt.yaml":
            overrides.update(dataset=str(shared_data / "dpo_en_demo.json"), max_samples=10, val_size=4,
                             cutoff_len=128)  # fmt: skip
        results = run_dpo(load_config(os.path.join(root, name), overrides))
        assert results["train"]["train_loss"] > 0 and "eval_loss" in results["eval"], name


def test_grid_demo_returns_one_row_per_cell(tmp_path):
    from discoalign.cli.demo.dpo import run_dpo_grid_demo

    rows = run_dpo_grid_demo(str(tmp_path), max_steps=2, synthetic_num_pairs=8, per_device_train_batch_size=2,
                             per_device_eval_batch_size=4, logging_steps=1, plot_loss=False, use_cpu=True)  # fmt: skip
    assert [r["cell"] for r in rows] == ["DPO", "DiscoDPO", "dynamic-beta DPO", "DiscoDPO + dynamic beta"]
    assert [r["mean variance"] == "-" for r in rows] == [True, False, True, False]
    assert rows[0]["mean beta"] == "0.100"
    for row in rows:
        assert {"final loss", "reward acc.", "true-pref acc."} <= set(row)
        assert 0.0 <= float(row["true-pref acc."]) <= 1.0 and float(row["final loss"]) > 0
