"""PPO data-parallel: `torchrun --nproc_per_node 2` on CPU (gloo).

Each rank rolls out different prompts with its own samples, so the ranks only stay identical if DDP averages
their gradients: after training, every rank's weights must be equal bit for bit (full fine-tuning with an
unused beta head, and LoRA with the beta head as KL controller), and only rank 0 writes samples.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from discoalign.config.schema import FinetuningArguments, ModelArguments
from discoalign.models.checkpoint import save_checkpoint
from discoalign.models.loader import load_model_with_heads

LAUNCHER = textwrap.dedent(
    """
    import hashlib, json, os, sys

    from discoalign.config import load_config
    from discoalign.train.ppo.workflow import build_ppo_trainer
    from transformers import set_seed

    rank = os.environ["RANK"]
    fingerprints = {}
    for path in sys.argv[2:]:
        cfg = load_config(path)
        set_seed(cfg.training.seed)
        trainer, _ = build_ppo_trainer(cfg)
        trainer.train()
        digest = hashlib.sha256()
        for name, tensor in sorted(trainer._policy().state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        fingerprints[path] = digest.hexdigest()
    with open(f"{sys.argv[1]}.rank{rank}", "w") as f:
        json.dump(fingerprints, f)
    from discoalign.train.distributed import shutdown_process_group

    shutdown_process_group()  # a clean exit: gloo threads torn down at interpreter exit can abort a rank
    """
)


@pytest.mark.slow
def test_torchrun_two_processes_keep_the_ranks_in_sync(tmp_path):
    if shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None:
        pytest.skip("torchrun is not installed beside this Python")
    import yaml

    torch.manual_seed(0)
    rm, tok = load_model_with_heads(ModelArguments(model_name_or_path="builtin:tiny-qwen3"), FinetuningArguments(),
                                    add_value_head=True)  # fmt: skip
    reward_model = save_checkpoint(rm, str(tmp_path / "rm"), tok)
    common = {
        "stage": "ppo", "model_name_or_path": "builtin:tiny-qwen3", "reward_model": reward_model,
        "dataset": "builtin:synthetic", "synthetic_num_pairs": 32, "max_new_tokens": 5,
        "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2, "ppo_epochs": 2, "max_steps": 2,
        "logging_steps": 1, "learning_rate": 1.0e-3, "use_cpu": True, "do_train": True, "disable_tqdm": True,
        "save_strategy": "no", "seed": 3, "plot_loss": False,
    }  # fmt: skip
    runs = {
        "full": {"add_beta_head": True},
        "lora": {"finetuning_type": "lora", "lora_rank": 4, "add_beta_head": True, "use_dynamic_beta": True},
    }
    paths = []
    for name, keys in runs.items():
        paths.append(str(tmp_path / f"{name}.yaml"))
        with open(paths[-1], "w") as f:
            yaml.safe_dump({**common, **keys, "output_dir": str(tmp_path / name)}, f)
    launcher = tmp_path / "launcher.py"
    launcher.write_text(LAUNCHER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", str(launcher), str(tmp_path / "fp"), *paths]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    rank0 = json.loads((tmp_path / "fp.rank0").read_text())
    rank1 = json.loads((tmp_path / "fp.rank1").read_text())
    assert rank0 == rank1 and len(rank0) == 2
    for name in runs:
        samples = (tmp_path / name / "samples.jsonl").read_text().splitlines()
        assert len(samples) == 2 * 5  # two logged steps x num_score_samples, written once (rank 0)
