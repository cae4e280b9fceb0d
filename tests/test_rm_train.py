"""Stage `rm` end to end: invariance of an unused variance head, resume, every arch, LoRA, outputs."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import train_losses
from transformers import TrainerCallback

from discoalign.config import build_config
from discoalign.train.tuner import run_exp


def rm_cfg(tmp_path, name: str, **kw):
    raw = {
        "stage": "rm",
        "model_name_or_path": "builtin:tiny-qwen3",
        "dataset": "builtin:synthetic",
        "synthetic_num_pairs": 64,
        "cutoff_len": 48,
        "output_dir": str(tmp_path / name),
        "per_device_train_batch_size": 8,
        "max_steps": 4,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "save_strategy": "no",
        "seed": 7,
        "do_train": True,
        "head_dropout": 0.1,  # dropout draws random numbers: the invariance must survive it
    }
    raw.update(kw)
    return build_config(raw)


def heads(output_dir: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(output_dir, "heads.safetensors"))


def test_unused_disco_head_changes_nothing_bit_for_bit(tmp_path):
    run_exp(rm_cfg(tmp_path, "plain"))
    run_exp(rm_cfg(tmp_path, "with_head", add_disco_head=True, disco_pref=False))
    plain, with_head = train_losses(str(tmp_path / "plain")), train_losses(str(tmp_path / "with_head"))
    assert len(plain) == 4
    assert torch.equal(torch.tensor(plain, dtype=torch.float64), torch.tensor(with_head, dtype=torch.float64))
    h_plain, h_with = heads(str(tmp_path / "plain")), heads(str(tmp_path / "with_head"))
    assert torch.equal(h_plain["value_head.summary.weight"], h_with["value_head.summary.weight"])
    assert "variance_head.summary.weight" in h_with and "variance_head.summary.weight" not in h_plain
    # the unused head was saved untouched: sigma^2 = 1 everywhere
    assert torch.count_nonzero(h_with["variance_head.summary.weight"]) == 0
    from safetensors.torch import load_file

    w_plain = load_file(os.path.join(tmp_path / "plain", "model.safetensors"))
    w_with = load_file(os.path.join(tmp_path / "with_head", "model.safetensors"))
    assert all(torch.equal(w_plain[k], w_with[k]) for k in w_plain)


def test_disco_training_moves_the_variance_head_and_differs_from_bt(tmp_path):
    run_exp(rm_cfg(tmp_path, "bt", head_dropout=0.0))
    run_exp(rm_cfg(tmp_path, "disco", add_disco_head=True, disco_pref=True, head_dropout=0.0))
    assert torch.count_nonzero(heads(str(tmp_path / "disco"))["variance_head.summary.weight"]) > 0
    # step 0: Disco with sigma^2 = 1 is -log Phi(d / sqrt 2), BT is -log sigmoid(d); d is the same at step 0
    bt0, disco0 = train_losses(str(tmp_path / "bt"))[0], train_losses(str(tmp_path / "disco"))[0]
    assert bt0 != disco0


class StopAfter(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
        return control


@pytest.mark.parametrize("finetuning_type", ["full", "lora"])
def test_resume_after_interruption_ends_like_an_uninterrupted_run(tmp_path, finetuning_type):
    common = dict(
        max_steps=6,
        save_strategy="steps",
        save_steps=3,
        finetuning_type=finetuning_type,
        add_disco_head=True,
        disco_pref=True,
        lr_scheduler_type="cosine",
        warmup_steps=2,
    )
    full = rm_cfg(tmp_path, "full", **common)
    run_exp(full)
    interrupted = rm_cfg(tmp_path, "interrupted", **common)
    run_exp(interrupted, callbacks=[StopAfter(3)])
    assert os.path.isdir(tmp_path / "interrupted" / "checkpoint-3")
    assert len(train_losses(str(tmp_path / "interrupted"))) == 3
    resumed = rm_cfg(
        tmp_path, "interrupted", resume_from_checkpoint=str(tmp_path / "interrupted" / "checkpoint-3"), **common
    )
    run_exp(resumed)
    final_full, final_resumed = train_losses(str(tmp_path / "full")), train_losses(str(tmp_path / "interrupted"))
    assert final_resumed[-1] == pytest.approx(final_full[-1], abs=1e-6)
    assert final_resumed == pytest.approx(final_full, abs=1e-6)
    h_full, h_res = heads(str(tmp_path / "full")), heads(str(tmp_path / "interrupted"))
    for key in h_full:
        assert torch.allclose(h_full[key], h_res[key], atol=1e-6), key


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gpt2"])
def test_every_arch_trains_full_and_lora(tmp_path, arch):
    for ft in ("full", "lora"):
        cfg = rm_cfg(
            tmp_path,
            f"{arch}_{ft}",
            model_name_or_path=f"builtin:tiny-{arch}",
            finetuning_type=ft,
            max_steps=12,
            learning_rate=3e-3,
            add_disco_head=True,
            disco_pref=True,
            head_dropout=0.0,
            gradient_checkpointing=(ft == "lora"),
        )
        run_exp(cfg)
        curve = train_losses(cfg.training.output_dir)
        assert sum(curve[-3:]) / 3 < sum(curve[:3]) / 3, (arch, ft, curve)
