"""The same YAML runs data-parallel: `torchrun --standalone --nproc_per_node 2` on CPU (gloo).

For `rm`, `dpo` and `sft`, the losses logged by a 2-process run equal those of a single-process run with twice the
per-device batch (to 1e-5): the seeded sampler gives global step k the same 2 x b pairs in both runs, each rank
averages its b pairs, and DDP averages the gradients. And only rank 0 writes: every file or folder created under
the output directories (checkpoints, final model, plots, config, metrics) is recorded per rank, through Python's
audit hooks plus wrappers around the native writers (safetensors, torch.save): rank 1 writes nothing but its
own RNG state into each checkpoint, which the Trainer keeps per rank for resuming.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
from helpers import train_losses, write_yaml

from discoalign.config import load_config
from discoalign.train.tuner import run_exp

PER_DEVICE_BATCH = 4
STEPS = 4

# Disco RM with packed pairs; DPO on the grid cell that uses every head (DiscoDPO + dynamic beta), whose
# log-probs and beta head must run inside the DDP-wrapped forward; packed SFT, whose loss divides by the token count
# of both processes' batches, so each rank's share must be scaled back before DDP averages the gradients (without
# that the updates, and losses, would differ). One launch for all three: each torchrun costs two interpreters.
CONFIGS = {
    "rm": {"stage": "rm", "learning_rate": 1.0e-3, "add_disco_head": True, "disco_pref": True, "pack_pairs": True},
    "dpo": {"stage": "dpo", "learning_rate": 5.0e-4, "pref_beta": 0.5, "add_disco_head": True, "disco_pref": True,
            "add_beta_head": True, "use_dynamic_beta": True},
    "sft": {"stage": "sft", "learning_rate": 3.0e-3, "sft_responses": "both", "packing": True},
}  # fmt: skip
COMMON = {
    "model_name_or_path": "builtin:tiny-qwen3",
    "dataset": "builtin:synthetic",
    "synthetic_num_pairs": 48,
    "cutoff_len": 48,
    "per_device_train_batch_size": PER_DEVICE_BATCH,
    "max_steps": STEPS,
    "logging_steps": 1,
    "save_strategy": "steps",
    "save_steps": 2,
    "seed": 7,
    "use_cpu": True,
    "do_train": True,
    "disable_tqdm": True,
    "plot_loss": True,
}

# Runs each YAML given on the command line with `run_exp`, recording which rank creates what under the outputs.
LAUNCHER = textwrap.dedent(
    """
    import json, os, sys

    rank = int(os.environ.get("RANK", "0"))
    record_path, roots = sys.argv[1], [os.path.abspath(p) for p in sys.argv[2].split(",")]
    writes = []

    def note(event, path):
        try:
            path = os.path.abspath(os.fsdecode(path))
        except TypeError:
            return
        if any(path.startswith(root) for root in roots):
            writes.append([event, path])

    def audit(event, args):
        if event == "open" and args[0] is not None and not isinstance(args[0], int):
            mode, flags = args[1] or "r", args[2] or 0
            if any(c in str(mode) for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                note(event, args[0])
        elif event in ("os.mkdir", "os.rename", "os.replace", "shutil.copyfile", "shutil.move"):
            note(event, args[1] if event in ("os.rename", "os.replace", "shutil.copyfile") else args[0])

    sys.addaudithook(audit)
    import safetensors.torch  # safetensors and torch.save write from native code, which no audit hook sees
    import torch

    native_save_file, native_torch_save = safetensors.torch.save_file, torch.save
    def save_file(tensors, filename, *a, **k):
        note("safetensors", filename)
        return native_save_file(tensors, filename, *a, **k)
    def torch_save(obj, f, *a, **k):
        if isinstance(f, (str, os.PathLike)):
            note("torch.save", f)
        return native_torch_save(obj, f, *a, **k)
    safetensors.torch.save_file, torch.save = save_file, torch_save

    from discoalign.config import load_config
    from discoalign.train.tuner import run_exp

    for path in sys.argv[3:]:
        run_exp(load_config(path))
    with open(f"{record_path}.rank{rank}", "w") as f:
        json.dump(writes, f)
    from discoalign.train.distributed import shutdown_process_group

    shutdown_process_group()  # a clean exit: gloo threads torn down at interpreter exit can abort a rank
    """
)


@pytest.mark.slow
def test_torchrun_two_processes_equal_single_process_and_only_rank0_writes(tmp_path):
    if shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None:
        pytest.skip("torchrun is not installed beside this Python")
    yamls, ddp_dirs = [], []
    for stage, keys in CONFIGS.items():
        ddp_dirs.append(str(tmp_path / f"ddp_{stage}"))
        yamls.append(write_yaml(tmp_path / f"{stage}.yaml", {**COMMON, **keys, "output_dir": ddp_dirs[-1]}))
    launcher = tmp_path / "launcher.py"
    launcher.write_text(LAUNCHER)
    record = tmp_path / "writes"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", str(launcher), str(record), ",".join(ddp_dirs), *yamls]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]

    for stage, yaml_path, ddp_dir in zip(CONFIGS, yamls, ddp_dirs):
        single_dir = str(tmp_path / f"single_{stage}")
        # The same YAML, one process, twice the per-device batch.
        run_exp(load_config(yaml_path, [f"output_dir={single_dir}",
                                        f"per_device_train_batch_size={2 * PER_DEVICE_BATCH}"]))  # fmt: skip
        ddp, single = train_losses(ddp_dir), train_losses(single_dir)
        assert len(ddp) == len(single) == STEPS, (stage, ddp, single)
        for a, b in zip(ddp, single):
            assert abs(a - b) < 1e-5, (stage, ddp, single)
        assert len(set(ddp)) > 1  # the runs trained (losses move), not a constant compared with itself

    rank0 = json.loads((tmp_path / "writes.rank0").read_text())
    rank1 = json.loads((tmp_path / "writes.rank1").read_text())
    # Rank 1 writes one thing only: its own RNG state inside each checkpoint (the Trainer keeps one per rank, so
    # that a resumed run continues every rank's random stream), creating the checkpoint folder if rank 0 has not.
    for event, path in rank1:
        name, parent = os.path.basename(path), os.path.basename(os.path.dirname(path))
        own_rng_state = event == "torch.save" and name == "rng_state_1.pth" and parent.startswith("checkpoint-")
        checkpoint_folder = event == "os.mkdir" and name.startswith("checkpoint-")
        assert own_rng_state or checkpoint_folder, (event, path)
    assert sum(event == "torch.save" for event, _ in rank1) == 2 * len(ddp_dirs)  # the recorder works on rank 1
    written = {path for _, path in rank0}
    for ddp_dir in ddp_dirs:
        expected_files = ("checkpoint-2", "checkpoint-4", "model.safetensors", "heads.safetensors",
                          "discoalign_config.yaml", "trainer_state.json", os.path.join("plots", "loss.png"))  # fmt: skip
        for expected in expected_files:
            assert os.path.join(ddp_dir, expected) in written, (ddp_dir, expected)
