"""One computation each: the reference's log-probs come from the policy's forward (same softcap, same numbers),
and the logged implicit rewards are the ones `dpo_loss` returned."""

from __future__ import annotations

import pytest
import torch
from helpers import dpo_config, dpo_trainer, train_logs

from discoalign.losses.dpo_metrics import step_metrics
from discoalign.losses.logps import pair_sequence_logps
from discoalign.train.tuner import run_exp

RUN = {
    "synthetic_num_pairs": 8,
    "max_steps": 1,
    "per_device_train_batch_size": 4,
    "learning_rate": 1e-2,
    "plot_loss": False,
}
SOFTCAP = 2.0  # small against the tiny model's logits, so capping changes every log-prob


def make_trainer(tmp_path, **overrides):
    return dpo_trainer(tmp_path, RUN, **overrides)


def first_batch(trainer) -> dict[str, torch.Tensor]:
    return trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(4)]))


@pytest.mark.parametrize("overrides", [{}, {"finetuning_type": "lora"}, {"pack_pairs": True, "logps_chunk_size": 3}])
def test_reference_logps_are_the_policy_forward_logps_with_softcap(tmp_path, overrides):
    trainer = make_trainer(tmp_path, **overrides)
    # No tiny arch has a soft-cap of its own; the log-prob path reads it from the config (Gemma 2's key).
    for model in (trainer.model, trainer.ref_model):
        if model is not None:
            model.config.final_logit_softcapping = SOFTCAP
    batch = first_batch(trainer)
    ref_chosen, ref_rejected, _ = trainer.reference_forward(batch)
    policy = trainer.model  # at step 0 the policy equals the reference (a copy, or LoRA's zero adapters)
    with torch.no_grad():
        out = policy(batch["input_ids"], batch["attention_mask"], with_heads=False, **trainer.forward_inputs(batch))
        capped = pair_sequence_logps(
            out.last_hidden_state, policy.lm_head, batch["labels"], trainer.logps_chunk_size, SOFTCAP
        )
        uncapped = pair_sequence_logps(out.last_hidden_state, policy.lm_head, batch["labels"], trainer.logps_chunk_size)
    assert torch.equal(torch.cat([ref_chosen, ref_rejected]), out.logps)
    assert torch.equal(out.logps, capped)
    assert not torch.isclose(capped, uncapped).any()


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"pref_loss": "ipo"},
        {"pref_loss": "hinge"},
        {"pref_loss": "robust", "label_smoothing": 0.1},
        {"add_beta_head": True, "use_dynamic_beta": True},
        {"add_disco_head": True, "disco_pref": True, "add_beta_head": True, "use_dynamic_beta": True},
        {"pref_beta_mode": "batch"},
    ],
)
def test_logged_rewards_are_the_loss_implicit_rewards(tmp_path, overrides):
    trainer = make_trainer(tmp_path, **overrides)
    trainer.train()  # one step off the reference, so the rewards are not all 0
    batch = first_batch(trainer)
    trainer._stored_metrics["train"].clear()
    with torch.no_grad():
        _, (_, out) = trainer.compute_loss(trainer.model, batch, return_outputs=True)
    logged = {k: v[0] for k, v in trainer._stored_metrics["train"].items()}
    chosen, rejected = out.chosen_rewards, out.rejected_rewards
    scaled = out.scaled  # the log-probs on the loss's scale
    # The loss's rewards: beta (per pair for dynamic beta) times the log-ratio on the loss's scale (ipo: per token).
    beta = out.beta
    assert torch.equal(chosen, beta * (scaled.chosen_logps - scaled.ref_chosen_logps))
    assert torch.equal(rejected, beta * (scaled.rejected_logps - scaled.ref_rejected_logps))
    assert logged["rewards/chosen"] == chosen.mean().item()
    assert logged["rewards/rejected"] == rejected.mean().item()
    assert logged["rewards/margins"] == (chosen - rejected).mean().item()
    assert logged["rewards/accuracies"] == (chosen > rejected).float().mean().item()
    # The same numbers as the metrics computing the rewards themselves (their behaviour without the loss's).
    recomputed = step_metrics(
        scaled.chosen_logps,
        scaled.rejected_logps,
        scaled.ref_chosen_logps,
        scaled.ref_rejected_logps,
        beta,
        log_beta=True,
    )
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert logged[key] == recomputed[key].item(), key


@pytest.mark.parametrize("finetuning_type", ["full", "lora"])
def test_mixed_precision_reference_rounds_like_the_policy(tmp_path, finetuning_type):
    """bf16 autocast (on CPU here): the reference runs under the policy's autocast, so a policy that has not moved
    (learning rate 1e-30) has implicit rewards of exactly 0, as TRL's has. Before, fp32 reference against bf16
    policy gave margins of about 1e-4 on this tiny model."""
    run_exp(
        dpo_config(
            tmp_path, RUN, max_steps=2, logging_steps=1, learning_rate=1e-30, bf16=True, finetuning_type=finetuning_type
        )
    )
    logs = train_logs(tmp_path)
    assert len(logs) == 2
    for log in logs:
        assert log["rewards/chosen"] == log["rewards/rejected"] == log["rewards/margins"] == 0.0
