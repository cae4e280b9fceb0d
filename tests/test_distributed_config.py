"""Distributed set-up that needs no second process: the DeepSpeed config checks and the row sharding."""

from __future__ import annotations

import json
import os

import pytest

from discoalign.cli.main import main
from discoalign.config import load_config
from discoalign.errors import ConfigError
from discoalign.train.distributed import gather_rows, shard_bounds

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
PPO = {"stage": "ppo", "model_name_or_path": "builtin:tiny-qwen3", "reward_model": "some/rm", "use_cpu": True}


def test_ppo_under_zero3_is_refused_before_any_model_loads():
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed")
    z3 = os.path.join(EXAMPLES, "deepspeed", "ds_z3_config.json")
    with pytest.raises(ConfigError, match="does not run under DeepSpeed ZeRO-3.*ZeRO-2"):
        load_config(None, {**PPO, "deepspeed": z3})
    z2 = os.path.join(EXAMPLES, "deepspeed", "ds_z2_config.json")
    assert load_config(None, {**PPO, "deepspeed": z2}).training.deepspeed == z2  # ZeRO-2 is allowed
    with pytest.raises(ConfigError, match="needs `gradient_accumulation_steps: 1`"):
        load_config(None, {**PPO, "deepspeed": z2, "gradient_accumulation_steps": 2})


def test_deepspeed_file_errors_name_the_file(tmp_path, capsys):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(None, {**PPO, "deepspeed": str(tmp_path / "missing.json")})
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="cannot be read as JSON"):
        load_config(None, {**PPO, "deepspeed": str(bad)})
    # From the command line: one paragraph, exit code 2, no traceback.
    assert main(["train", os.path.join(EXAMPLES, "ppo.yaml"), f"deepspeed={bad}", "use_cpu=true"]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "Traceback" not in err


def test_deepspeed_missing_package_is_a_config_error(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigError, match=r"pip install 'discoalign\[deepspeed\]'"):
        load_config(None, {**PPO, "deepspeed": str(config)})


def test_zero3_without_gathered_saves_is_refused(tmp_path):
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed")
    config = json.load(open(os.path.join(EXAMPLES, "deepspeed", "ds_z3_config.json")))
    config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = False
    path = tmp_path / "z3.json"
    path.write_text(json.dumps(config))
    rm = {"stage": "rm", "model_name_or_path": "builtin:tiny-qwen3", "use_cpu": True, "deepspeed": str(path)}
    with pytest.raises(ConfigError, match="stage3_gather_16bit_weights_on_model_save"):
        load_config(None, rm)


@pytest.mark.parametrize("length,shards", [(40, 2), (41, 2), (7, 3), (2, 4), (0, 2)])
def test_shards_cover_every_row_once_in_order(length, shards):
    bounds = [shard_bounds(length, shards, i) for i in range(shards)]
    rows = [r for start, end in bounds for r in range(start, end)]
    assert rows == list(range(length))
    sizes = [end - start for start, end in bounds]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_gather_rows_is_the_identity_in_one_process():
    import torch

    local = torch.arange(12.0).reshape(6, 2)
    assert gather_rows(local, 6) is local
