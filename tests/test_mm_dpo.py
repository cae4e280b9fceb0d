"""Stage `dpo` on `builtin:synthetic-vl`: the four grid cells, the loss by hand, and the decoupling invariances."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import train_recorded

from discoalign.config import build_config
from discoalign.models.tiny_multimodal import write_tiny_multimodal_model
from discoalign.train.dpo.workflow import build_dpo_trainer

BASE = {
    "stage": "dpo",
    "model_name_or_path": "builtin:tiny-qwen2-vl",
    "dataset": "builtin:synthetic-vl",
    "synthetic_num_pairs": 8,
    "pref_beta": 0.1,
    "max_steps": 3,
    "per_device_train_batch_size": 2,
    "learning_rate": 1e-2,
    "logging_steps": 1,
    "save_strategy": "no",
    "do_train": True,
    "seed": 0,
    "use_cpu": True,
    "disable_tqdm": True,
    "plot_loss": False,
}
GRID = {
    "dpo": {},
    "disco_dpo": {"add_disco_head": True, "disco_pref": True},
    "dynamic_beta": {"add_beta_head": True, "use_dynamic_beta": True},
    "disco_dynamic_beta": {"add_disco_head": True, "disco_pref": True, "add_beta_head": True, "use_dynamic_beta": True},
}


def train_three_steps(tmp_path, **overrides):
    """Train 3 steps; return (per-step losses (3,), final backbone weights, trainer)."""
    cfg = build_config({**BASE, "output_dir": str(tmp_path / "run"), **overrides})
    return train_recorded(build_dpo_trainer(cfg)[0])


def assert_same_run(a, b):
    assert torch.equal(a[0], b[0]), (a[0], b[0])
    assert a[1].keys() == b[1].keys() and all(torch.equal(a[1][k], b[1][k]) for k in a[1])


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return train_three_steps(tmp_path_factory.mktemp("plain"))


@pytest.mark.parametrize("cell", GRID)
@pytest.mark.parametrize("finetuning_type", ["full", "lora"])
def test_the_four_grid_cells_train_on_images(tmp_path, cell, finetuning_type):
    losses, weights, trainer = train_three_steps(tmp_path, finetuning_type=finetuning_type, **GRID[cell])
    assert losses.shape == (3,) and torch.isfinite(losses).all() and not torch.equal(losses[0], losses[2])
    logged = {k for entry in trainer.state.log_history for k in entry}
    assert "rewards/accuracies" in logged
    assert ("beta/mean" in logged) == ("beta" in cell) and ("variance/chosen" in logged) == ("disco" in cell)
    frozen = [n for n, p in trainer.model.named_parameters() if ".visual." in n]
    assert frozen and not any(p.requires_grad for n, p in trainer.model.named_parameters() if ".visual." in n)


def test_precomputed_reference_with_images(tmp_path):
    losses, _, trainer = train_three_steps(tmp_path, precompute_ref_logps=True, **GRID["disco_dynamic_beta"])
    assert trainer.reference_forward_calls > 0 and trainer.ref_model is None and torch.isfinite(losses).all()


def test_a_disco_head_without_disco_pref_equals_plain_dpo(tmp_path, plain):
    run = train_three_steps(tmp_path, add_disco_head=True, disco_pref=False, head_dropout=0.1)
    assert_same_run(plain, run)
    assert any(k.startswith("variance/") for entry in run[2].state.log_history for k in entry)


def test_a_beta_head_without_dynamic_beta_equals_plain_dpo(tmp_path, plain):
    run = train_three_steps(tmp_path, add_beta_head=True, use_dynamic_beta=False)
    assert_same_run(plain, run)
    assert torch.equal(run[2].model.beta_head.summary.weight, torch.zeros(1, 64))  # never trained


def test_zero_initialised_dynamic_beta_gives_plain_loss_at_step_0(tmp_path, plain):
    losses, _, trainer = train_three_steps(tmp_path, add_beta_head=True, use_dynamic_beta=True)
    assert torch.equal(losses[0], plain[0][0])
    assert trainer.model.beta_head.summary.weight.abs().sum() > 0


def _by_hand_logps(model, batch) -> torch.Tensor:
    """Summed response log-probs from the full logits of the model's own forward, images included (2B,) float64."""
    media = {k: batch[k] for k in model.supported_parameters if k in batch}
    with torch.no_grad():
        logits = model.causal_lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **media).logits
    logp = logits.double()[:, :-1].log_softmax(-1)
    labels = batch["labels"][:, 1:]
    picked = torch.gather(logp, -1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * (labels != -100)).sum(-1)


def test_the_dpo_loss_by_hand_sees_the_images_in_policy_and_reference(tmp_path):
    other = write_tiny_multimodal_model("qwen2-vl", str(tmp_path / "ref"), seed=1)
    cfg = build_config({**BASE, "output_dir": str(tmp_path / "run"), "ref_model_name_or_path": other})
    trainer, _ = build_dpo_trainer(cfg)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    assert "pixel_values" in batch
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch).item()
    policy, ref = _by_hand_logps(trainer.model, batch), _by_hand_logps(trainer.ref_model, batch)
    d = (policy[:4] - ref[:4]) - (policy[4:] - ref[4:])
    by_hand = sum(-math.log(1.0 / (1.0 + math.exp(-0.1 * float(di)))) for di in d) / 4
    assert loss == pytest.approx(by_hand, abs=1e-5)
    text_only = {k: v for k, v in batch.items() if k not in ("pixel_values", "image_grid_thw", "mm_token_type_ids")}
    with torch.no_grad():
        assert abs(trainer.compute_loss(trainer.model, text_only).item() - loss) > 1e-6  # the images count
