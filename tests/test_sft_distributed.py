"""Stage sft data-parallel: `torchrun --nproc_per_node 2` on CPU (gloo) logs the losses of one process with twice
the per-device batch (to 1e-5). The loss divides by the token count of both processes' batches, so each rank's
share must be scaled back before DDP averages the gradients; without that the updates (and losses) would differ."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import yaml
from helpers import train_losses

from discoalign.config import load_config
from discoalign.train.tuner import run_exp

CONFIG = {
    "stage": "sft", "model_name_or_path": "builtin:tiny-qwen3", "dataset": "builtin:synthetic",
    "synthetic_num_pairs": 48, "sft_responses": "both", "cutoff_len": 48, "packing": True,
    "per_device_train_batch_size": 4, "max_steps": 4, "learning_rate": 3.0e-3, "logging_steps": 1,
    "save_strategy": "no", "seed": 7, "use_cpu": True, "do_train": True, "disable_tqdm": True, "plot_loss": False,
}  # fmt: skip


@pytest.mark.slow
def test_sft_two_processes_equal_one_process(tmp_path):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    if shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None:
        pytest.skip("torchrun is not installed beside this Python")
    config = tmp_path / "sft.yaml"
    config.write_text(yaml.safe_dump({**CONFIG, "output_dir": str(tmp_path / "ddp")}))
    launcher = tmp_path / "launch.py"
    launcher.write_text("import sys\nfrom discoalign.config import load_config\nfrom discoalign.train.tuner import "
                        "run_exp\nfrom discoalign.train.distributed import shutdown_process_group\n"
                        "run_exp(load_config(sys.argv[1]))\nshutdown_process_group()\n")  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", str(launcher), str(config)], env=env,
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    run_exp(load_config(str(config), [f"output_dir={tmp_path / 'single'}", "per_device_train_batch_size=8"]))
    ddp, single = train_losses(tmp_path / "ddp"), train_losses(tmp_path / "single")
    assert len(ddp) == len(single) == 4 and len(set(single)) > 1
    for a, b in zip(ddp, single):
        assert abs(a - b) < 1e-5, (ddp, single)
