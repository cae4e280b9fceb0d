"""FSDP2 (accelerate, `fsdp: full_shard auto_wrap` + `fsdp_version: 2`) under `torchrun --nproc_per_node 2` on CPU.

`rm` (Disco) and `dpo` (dynamic beta, frozen reference) train with their decoder layers sharded; the logged losses
equal a single-process run with the same global batch (LOSS_TOL, as for ZeRO) and the saved model (full state
dict, gathered on save) loads with our loader and scores as the in-memory model did (SCORE_TOL).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from helpers import write_yaml
from test_distributed_zero import (
    COMMON,
    JOBS,
    LAUNCHER,
    LOSS_TOL,
    PER_DEVICE_BATCH,
    SCORE_TOL,
    STEPS,
    assert_close,
    logged_losses,  # fmt: skip
    saved_fingerprint,
)

from discoalign.config import load_config
from discoalign.train.tuner import run_exp

# As the ZeRO test's ZERO_JOBS: the BT reward model and plain full DPO run the same sharded paths as the Disco and
# dynamic-beta jobs, less a head; add them back if a BT-only or plain-DPO-only FSDP bug is ever suspected.
FSDP_JOBS = ("rm_disco", "dpo_dynamic_beta", "dpo_lora", "dpo_precomputed")


@pytest.mark.slow
def test_fsdp2_equals_single_process_and_saves_gathered(tmp_path, tiny_dirs):
    if shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None:
        pytest.skip("torchrun is not installed beside this Python")
    fsdp_config = tmp_path / "fsdp.json"
    fsdp_config.write_text(json.dumps({"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["Qwen3DecoderLayer"],
                                       "reshard_after_forward": True, "state_dict_type": "FULL_STATE_DICT"}))  # fmt: skip
    runs, paths = {}, []
    for name in FSDP_JOBS:
        keys = JOBS[name]
        model = "builtin:tiny-qwen3" if keys["stage"] == "rm" else tiny_dirs["qwen3"]
        runs[name] = {**COMMON, **keys, "model_name_or_path": model, "save_strategy": "no"}
        paths.append(write_yaml(tmp_path / f"fsdp_{name}.yaml", {**runs[name], "output_dir": str(tmp_path / f"fsdp_{name}"),
                                                                "fsdp": "full_shard auto_wrap",
                                                                "fsdp_config": str(fsdp_config)}))  # fmt: skip
    launcher = tmp_path / "launcher.py"
    launcher.write_text(LAUNCHER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    cmd = [
        torchrun,
        "--standalone",
        "--nproc_per_node",
        "2",
        str(launcher),
        str(tmp_path / "record"),
        tests_dir,
        *paths,
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-6000:]
    record = json.loads((tmp_path / "record.rank0").read_text())
    for name, path in zip(FSDP_JOBS, paths):
        single_dir = str(tmp_path / f"single_{name}")
        run_exp(load_config(write_yaml(tmp_path / f"single_{name}.yaml", {
            **runs[name], "output_dir": single_dir, "per_device_train_batch_size": 2 * PER_DEVICE_BATCH})))  # fmt: skip
        single, fsdp = logged_losses(single_dir), logged_losses(tmp_path / f"fsdp_{name}")
        assert len(single) == STEPS and single.keys() == fsdp.keys(), (name, single, fsdp)
        for step in single:
            assert abs(single[step] - fsdp[step]) <= LOSS_TOL, (name, single, fsdp)
        assert_close(saved_fingerprint(str(tmp_path / f"fsdp_{name}"), runs[name]), record["fingerprints"][path],
                     SCORE_TOL, f"FSDP2 {name} saved vs in memory")  # fmt: skip
