"""The speed and multi-process examples: the speed YAMLs train, the DeepSpeed / accelerate configs are well formed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from discoalign.config import load_config
from discoalign.train.tuner import run_exp

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("name", ["rm_fast.yaml", "dpo_fast.yaml"])
def test_speed_examples_train_one_step_with_their_switches_on(tmp_path, name):
    overrides = {"output_dir": str(tmp_path), "max_steps": 1, "synthetic_num_pairs": 16, "do_train": True,
                 "do_eval": False, "per_device_train_batch_size": 4, "plot_loss": False, "disable_tqdm": True,
                 "use_cpu": True}  # fmt: skip
    cfg = load_config(str(EXAMPLES / "speed" / name), overrides)
    assert cfg.data.pack_pairs and cfg.data.group_by_length
    results = run_exp(cfg)
    assert results["train"]["train_loss"] > 0


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_configs_name_their_zero_stage_and_leave_sizes_to_the_trainer(stage):
    config = json.loads((EXAMPLES / "deepspeed" / f"ds_z{stage}_config.json").read_text())
    assert config["zero_optimization"]["stage"] == stage
    # "auto" lets the HF Trainer fill these from the run's YAML, so one JSON serves every run.
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        assert config[key] == "auto"
    assert config["bf16"]["enabled"] == "auto"
    if stage == 3:  # our checkpoints need the full weights gathered at save time
        assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


@pytest.mark.parametrize("name,kind", [("fsdp.yaml", "FSDP"), ("ddp.yaml", "MULTI_GPU")])
def test_accelerate_configs_load_with_accelerate(name, kind):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(EXAMPLES / "accelerate" / name))
    assert config.distributed_type.value == kind
    if kind == "FSDP":
        assert config.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"
        assert config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"]
