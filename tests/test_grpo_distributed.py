"""GRPO data-parallel (`torchrun --standalone --nproc_per_node 2`, CPU, gloo; `dapo`) and under DeepSpeed ZeRO-2
(`grpo` + RLOO) equals one process with twice the per-device batch.

Each rank rolls out its own prompts, so the runs can only match if sampling does not depend on which process holds a
group: the launcher (and the single-process run) draw each group's completions from a generator seeded by the
group's prompt and how often that prompt was sampled before (generation chunks of one group,
`per_device_eval_batch_size: num_generations`). Then the prompt schedule gives global step k the same groups in
both runs, group advantages stay on one process, and the loss must be aggregated over processes as TRL does:
`dapo` divides by the generation batch's tokens gathered over all processes, `grpo` averages completions. The
logged loss of every step (averaged over processes by the Trainer) must equal the single-process run's.
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
from helpers import write_yaml

from discoalign.config.schema import FinetuningArguments, ModelArguments
from discoalign.models.checkpoint import save_checkpoint
from discoalign.models.loader import load_model_with_heads

TOL = 1e-5
PER_DEVICE_BATCH = 4
SEEDED_SAMPLING = textwrap.dedent(
    """
    import torch
    import discoalign.train.ppo.collect as collect

    _sample, _seen = collect.sample_responses, {}

    def seeded_sample_responses(policy, query_ids, query_mask, config):
        key = tuple(query_ids[0][query_mask[0].bool()].tolist())
        _seen[key] = _seen.get(key, 0) + 1
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash(key) % 100003 + 1000 * _seen[key])
            return _sample(policy, query_ids, query_mask, config)

    collect.sample_responses = seeded_sample_responses
    """
)
LAUNCHER = (
    "import os, sys\nos.environ['PYTHONHASHSEED'] = '0'\n"
    + SEEDED_SAMPLING
    + textwrap.dedent(
        """
        from discoalign.config import load_config
        from discoalign.train.tuner import run_exp

        for path in sys.argv[1:]:
            _seen.clear()  # each run starts its sampling stream afresh, as the single-process run does
            run_exp(load_config(path))
        from discoalign.train.distributed import shutdown_process_group

        shutdown_process_group()
        """
    )
)


def logged(output_dir, key) -> list[float]:
    with open(os.path.join(output_dir, "trainer_state.json")) as f:
        return [e[key] for e in json.load(f)["log_history"] if "loss" in e and key in e]


@pytest.mark.slow
def test_grpo_ddp_and_zero2_equal_single_process(tmp_path):
    if shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None:
        pytest.skip("torchrun is not installed beside this Python")
    torch.manual_seed(0)
    rm, tok = load_model_with_heads(ModelArguments(model_name_or_path="builtin:tiny-qwen3"),
                                    FinetuningArguments(add_disco_head=True), add_value_head=True)  # fmt: skip
    with torch.no_grad():
        rm.variance_head.summary.weight.normal_(0, 0.2)
    reward_model = save_checkpoint(rm, str(tmp_path / "rm"), tok)
    common = {
        "stage": "grpo", "model_name_or_path": "builtin:tiny-qwen3", "reward_model": reward_model,
        "dataset": "builtin:synthetic", "synthetic_num_pairs": 32, "max_new_tokens": 5, "num_generations": 4,
        "per_device_train_batch_size": PER_DEVICE_BATCH, "per_device_eval_batch_size": 4, "num_iterations": 2,
        "max_steps": 3, "logging_steps": 1, "learning_rate": 1.0e-3, "use_cpu": True, "do_train": True,
        "disable_tqdm": True, "save_strategy": "no", "seed": 3, "plot_loss": False, "pref_beta": 0.05,
        "uncertainty_shrinkage": 1.0,
    }  # fmt: skip
    zero2 = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "deepspeed",
                         "ds_z2_config.json")  # fmt: skip
    # DDP runs `dapo` (token-level aggregation over processes), ZeRO-2 runs `grpo` with RLOO (per-completion
    # averages, leave-one-out advantages): each aggregation and each engine once, against its own single run.
    runs = {
        "dapo": {"grpo_loss_type": "dapo"},
        "grpo_rloo": {"grpo_loss_type": "grpo", "advantage_estimator": "rloo", "deepspeed": zero2},
    }
    yamls = {name: write_yaml(tmp_path / f"{name}.yaml", {**common, **keys, "output_dir": str(tmp_path / name)})
             for name, keys in runs.items()}  # fmt: skip
    launcher = tmp_path / "launcher.py"
    launcher.write_text(LAUNCHER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONHASHSEED": "0"}  # fmt: skip
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    done = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", str(launcher), *yamls.values()],
                          env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]

    # Both single-process runs in one process (one interpreter start): each argument is `yaml=output_dir`.
    single = tmp_path / "single.py"
    single.write_text("import os, sys\n" + SEEDED_SAMPLING + textwrap.dedent(
        f"""
        from discoalign.config import load_config
        from discoalign.train.tuner import run_exp

        for arg in sys.argv[1:]:
            path, out = arg.split("=")
            _seen.clear()
            run_exp(load_config(path, [f"output_dir={{out}}", "per_device_train_batch_size={2 * PER_DEVICE_BATCH}",
                                       "deepspeed="]))  # one process, no engine
        """
    ))  # fmt: skip
    singles = {name: str(tmp_path / f"single_{name}") for name in ("dapo", "grpo_rloo")}
    cmd = [sys.executable, str(single), *(f"{yamls[name]}={out}" for name, out in singles.items())]
    one = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-4000:]
    for name, out in singles.items():
        # the Trainer averages the logged loss over processes (rollout metrics are rank 0's own groups)
        a, b = logged(tmp_path / name, "loss"), logged(out, "loss")
        assert len(a) == len(b) == 3, (name, a, b)
        assert max(abs(x - y) for x, y in zip(a, b)) < TOL, (name, a, b)
        assert len(set(b)) > 1
