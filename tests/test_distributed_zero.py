"""DeepSpeed ZeRO-2 and ZeRO-3 under `torchrun --standalone --nproc_per_node 2` on CPU (gloo), against one process.

One torchrun launch trains every job (`rm` Disco; `dpo` LoRA with adapters disabled as reference, full with a
frozen reference and dynamic beta, precomputed reference with dynamic beta) under both stages, then resumes each
ZeRO-3 run from its step-2 checkpoint (ZeRO-2 resumes through the same DeepSpeed checkpoint code with whole weights;
ZeRO-3's sharded weights and optimizer state are the harder case). BT and plain full DPO are not separate jobs:
they are the Disco and dynamic-beta jobs without a head, and the suite's time budget is spent where paths differ.
For every job and stage the test checks:

* the logged losses equal a single-process run without DeepSpeed with the same global batch (2 x 4 pairs) to
  LOSS_TOL: the same pairs per step, gradients averaged over ranks, the same AdamW arithmetic on fp32 weights;
* the saved model and heads, loaded with our loader, give the numbers the in-memory model gave at the end of
  training (mean, variance, response log-probs, beta scale on fixed inputs) to SCORE_TOL. Under ZeRO-3 the
  in-memory weights are shards: the save gathers them (`stage3_gather_16bit_weights_on_model_save`);
* the beta head's buffers (`feature_mean`, `feature_count`, `logit_offset`) equal the single-process run's: they
  follow the global batch, not each rank's half;
* (ZeRO-3) a run resumed from the ZeRO checkpoint at step 2 logs the same losses for steps 3-4 and ends with the same
  model (RESUME_TOL);
* the precomputed reference is computed half on each rank, and the run's logs appear once, not once per rank.

The first DeepSpeed start on a machine JIT-builds its CPU shared-memory communication op (about a minute, cached
under ~/.cache/torch_extensions afterwards).
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

from discoalign.config import load_config
from discoalign.train.tuner import run_exp

# ZeRO and one process sum the same numbers in another order (reduce-scatter, flattened buffers). Measured on CPU:
# at most 5.4e-7 over 4 steps (DPO), 1.2e-7 (RM); the losses move by > 1e-2 per step. Resumes measured exact (0).
LOSS_TOL = 5e-6
SCORE_TOL = 1e-5
RESUME_TOL = 1e-6
PER_DEVICE_BATCH = 4
STEPS = 4

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "deepspeed")

# `rm` starts from the built-in model (built whole, sharded by the engine), `dpo` from a saved one (ZeRO-3 shards
# it while it loads, as for any real checkpoint).
JOBS = {
    "rm_bt": {"stage": "rm", "learning_rate": 1.0e-3},
    "rm_disco": {"stage": "rm", "learning_rate": 1.0e-3, "add_disco_head": True, "disco_pref": True},
    "dpo_full": {"stage": "dpo", "learning_rate": 5.0e-4, "pref_beta": 0.5},
    "dpo_lora": {"stage": "dpo", "learning_rate": 5.0e-3, "pref_beta": 0.5, "finetuning_type": "lora",
                 "lora_rank": 4},
    "dpo_dynamic_beta": {"stage": "dpo", "learning_rate": 5.0e-4, "pref_beta": 0.5, "add_beta_head": True,
                         "use_dynamic_beta": True, "beta_head_lr_ratio": 20.0, "beta_head_kind": "tanh"},
    "dpo_precomputed": {"stage": "dpo", "learning_rate": 5.0e-4, "pref_beta": 0.5, "add_beta_head": True,
                        "use_dynamic_beta": True, "beta_head_lr_ratio": 20.0, "precompute_ref_logps": True},
}  # fmt: skip
# The jobs run under ZeRO here: BT and plain full DPO are the Disco and dynamic-beta jobs without a head (FSDP runs
# them all, tests/test_distributed_fsdp.py).
ZERO_JOBS = ("rm_disco", "dpo_lora", "dpo_dynamic_beta", "dpo_precomputed")
# PPO under ZeRO-2 against DDP (both 2 processes: each rank rolls out its own prompts, so one process is no match).
# `gradient_accumulation_steps` stays 1 (config/validate.py refuses more under DeepSpeed); ZeRO-3 is refused.
PPO = {
    "stage": "ppo", "model_name_or_path": "builtin:tiny-qwen3", "dataset": "builtin:synthetic",
    "synthetic_num_pairs": 32, "max_new_tokens": 5, "per_device_train_batch_size": 4, "ppo_epochs": 2,
    "max_steps": 2, "logging_steps": 1, "learning_rate": 1.0e-3, "use_cpu": True, "do_train": True,
    "disable_tqdm": True, "save_strategy": "no", "seed": 3, "plot_loss": False, "add_beta_head": True,
    "use_dynamic_beta": True,
}  # fmt: skip
COMMON = {
    "dataset": "builtin:synthetic",
    "synthetic_num_pairs": 40,
    "cutoff_len": 40,
    "per_device_train_batch_size": PER_DEVICE_BATCH,
    "max_steps": STEPS,
    "logging_steps": 1,
    "save_strategy": "steps",
    "save_steps": 2,
    "seed": 7,
    "use_cpu": True,
    "do_train": True,
    "disable_tqdm": True,
    "plot_loss": False,
}


def fingerprint(model) -> dict[str, list[float]]:
    """Numbers a `ModelWithHeads` gives on fixed inputs (eval mode, no gradient): the value / variance heads at
    the last token, the summed log-probs of 4 responses, and the beta head's s(x) on fixed features.

    Calls the module, so that under ZeRO-3 (run on every rank) each layer gathers its shards."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, 200, (4, 12), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[3, :3] = 0  # one left-padded row
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :5] = -100
    hidden_size = model.config.get_text_config().hidden_size
    features = torch.randn(2, hidden_size, generator=generator)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(input_ids, attention_mask, with_heads=True, with_variance=True, labels=labels,
                    prompt_features=features if model.beta_head is not None else None)  # fmt: skip
    model.train(was_training)
    result = {"logps": out.logps.tolist()}
    for key in ("mean", "variance", "beta_scale"):
        if getattr(out, key) is not None:
            result[key] = getattr(out, key).tolist()
    return result


# Trains each YAML given on the command line; rank 0 records the in-memory fingerprint at the end of training and
# every rank how many pairs it ran through the reference (only the precompute pass does, for `dpo_precomputed`).
LAUNCHER = textwrap.dedent(
    """
    import json, logging, os, sys

    logging.basicConfig(format="[discoalign] %(levelname)s %(message)s", level=logging.INFO)  # as the CLI does
    sys.path.insert(0, sys.argv[2])
    from transformers import TrainerCallback

    from discoalign.config import load_config
    from discoalign.train.distributed import is_zero3_partitioned
    from discoalign.train.dpo.trainer import DPOTrainer
    from discoalign.train.tuner import run_exp
    from test_distributed_zero import fingerprint

    rank = int(os.environ["RANK"])
    record = {"fingerprints": {}, "reference_pairs": {}, "reference_sharded": {}}
    current = {}
    reference_forward = DPOTrainer.reference_forward

    def counting_reference_forward(self, inputs):
        record["reference_pairs"][current["path"]] = (record["reference_pairs"].get(current["path"], 0)
                                                      + inputs["labels"].shape[0] // 2)
        if self.ref_model is not None:  # a separate frozen reference: is each rank holding only shards of it?
            record["reference_sharded"][current["path"]] = is_zero3_partitioned(self.ref_model)
        return reference_forward(self, inputs)

    DPOTrainer.reference_forward = counting_reference_forward

    class Fingerprint(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kwargs):
            record["fingerprints"][current["path"]] = fingerprint(model)

    for path in sys.argv[3:]:
        current["path"] = path
        run_exp(load_config(path), callbacks=[Fingerprint()])
    with open(f"{sys.argv[1]}.rank{rank}", "w") as f:
        json.dump(record, f)
    from discoalign.train.distributed import shutdown_process_group

    shutdown_process_group()  # a clean exit: gloo threads torn down at interpreter exit can abort a rank
    """
)


def logged_losses(output_dir) -> dict[int, float]:
    with open(os.path.join(output_dir, "trainer_state.json")) as f:
        history = json.load(f)["log_history"]
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}


def saved_fingerprint(output_dir: str, job: dict) -> dict[str, list[float]]:
    from discoalign.config.schema import FinetuningArguments, ModelArguments
    from discoalign.models.loader import load_model_with_heads

    ft = FinetuningArguments(stage=job["stage"], add_disco_head=job.get("add_disco_head", False),
                             add_beta_head=job.get("add_beta_head", False),
                             finetuning_type=job.get("finetuning_type", "full"))  # fmt: skip
    model, _ = load_model_with_heads(ModelArguments(model_name_or_path=output_dir), ft,
                                     add_value_head=job["stage"] in ("rm", "ppo"), is_trainable=False)  # fmt: skip
    return fingerprint(model)


def saved_beta_buffers(output_dir: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    heads = load_file(os.path.join(output_dir, "heads.safetensors"))
    return {k: v for k, v in heads.items() if k.startswith("beta_head.") and "summary" not in k}


def assert_close(a: dict[str, list[float]], b: dict[str, list[float]], tol: float, what) -> None:
    assert a.keys() == b.keys(), (what, a.keys(), b.keys())
    for key in a:
        diff = (torch.tensor(a[key]) - torch.tensor(b[key])).abs().max().item()
        assert diff <= tol, (what, key, diff, a[key], b[key])


@pytest.mark.slow
def test_deepspeed_zero2_and_zero3_equal_single_process_save_and_resume(tmp_path, tiny_dirs):
    if shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None:
        pytest.skip("torchrun is not installed beside this Python")
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (`pip install 'discoalign[deepspeed]'`)")
    runs = {}
    for name in ZERO_JOBS:
        keys = JOBS[name]
        model = "builtin:tiny-qwen3" if keys["stage"] == "rm" else tiny_dirs["qwen3"]
        values = {**COMMON, **keys, "model_name_or_path": model}
        runs[name] = values
        for zero in (2, 3):
            ds = os.path.join(EXAMPLES, f"ds_z{zero}_config.json")
            out = str(tmp_path / f"z{zero}_{name}")
            write_yaml(tmp_path / f"z{zero}_{name}.yaml", {**values, "deepspeed": ds, "output_dir": out})
            if zero == 3:
                write_yaml(tmp_path / f"z{zero}_{name}_resume.yaml",
                           {**values, "deepspeed": ds, "output_dir": out + "_resume",
                            "resume_from_checkpoint": os.path.join(out, "checkpoint-2")})  # fmt: skip
    from discoalign.config.schema import FinetuningArguments, ModelArguments
    from discoalign.models.checkpoint import save_checkpoint
    from discoalign.models.loader import load_model_with_heads

    torch.manual_seed(0)
    rm, tok = load_model_with_heads(ModelArguments(model_name_or_path="builtin:tiny-qwen3"), FinetuningArguments(),
                                    add_value_head=True)  # fmt: skip
    ppo = {**PPO, "reward_model": save_checkpoint(rm, str(tmp_path / "rm"), tok)}
    ppo_yamls = [
        write_yaml(tmp_path / "ppo_ddp.yaml", {**ppo, "output_dir": str(tmp_path / "ppo_ddp")}),
        write_yaml(
            tmp_path / "ppo_z2.yaml",
            {**ppo, "output_dir": str(tmp_path / "ppo_z2"), "deepspeed": os.path.join(EXAMPLES, "ds_z2_config.json")},
        ),
    ]
    trained = [str(tmp_path / f"z{zero}_{name}.yaml") for zero in (2, 3) for name in ZERO_JOBS]
    resumed = [path.replace(".yaml", "_resume.yaml") for path in trained if os.path.basename(path).startswith("z3_")]
    launcher = tmp_path / "launcher.py"
    launcher.write_text(LAUNCHER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", str(launcher), str(tmp_path / "record"), tests_dir,
           *ppo_yamls, *trained, *resumed]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-6000:]
    record = json.loads((tmp_path / "record.rank0").read_text())
    record1 = json.loads((tmp_path / "record.rank1").read_text())

    # Logs once per run: the data summary is logged by rank 0 only.
    assert (done.stdout + done.stderr).count("training rows") == len(ppo_yamls) + len(trained) + len(resumed)

    # PPO: ZeRO-2 takes the same updates as DDP; the saved policy and critic score as the in-memory ones did.
    ddp, zero2 = logged_losses(tmp_path / "ppo_ddp"), logged_losses(tmp_path / "ppo_z2")
    assert len(ddp) == 2 and ddp.keys() == zero2.keys(), (ddp, zero2)
    for step in ddp:
        assert abs(ddp[step] - zero2[step]) <= LOSS_TOL, (ddp, zero2)
    ppo_job = {"stage": "ppo", "add_beta_head": True}
    assert_close(saved_fingerprint(str(tmp_path / "ppo_z2"), ppo_job), record["fingerprints"][ppo_yamls[1]],
                 SCORE_TOL, "ZeRO-2 ppo saved vs in memory")  # fmt: skip

    for name, values in runs.items():
        single_dir = str(tmp_path / f"single_{name}")
        run_exp(load_config(write_yaml(tmp_path / f"single_{name}.yaml", {
            **values, "output_dir": single_dir, "per_device_train_batch_size": 2 * PER_DEVICE_BATCH})))  # fmt: skip
        single = logged_losses(single_dir)
        assert len(single) == STEPS and len(set(single.values())) > 1  # it trained: losses move
        for zero in (2, 3):
            what = f"ZeRO-{zero} {name}"
            path, out = str(tmp_path / f"z{zero}_{name}.yaml"), str(tmp_path / f"z{zero}_{name}")
            losses = logged_losses(out)
            assert losses.keys() == single.keys(), (what, losses, single)
            for step in single:
                assert abs(losses[step] - single[step]) <= LOSS_TOL, (what, step, losses, single)
            # The saved checkpoint scores as the trained model did in memory.
            in_memory = record["fingerprints"][path]
            assert_close(saved_fingerprint(out, values), in_memory, SCORE_TOL, what + " saved vs in memory")
            if values.get("add_beta_head"):
                ours, theirs = saved_beta_buffers(out), saved_beta_buffers(single_dir)
                assert ours["beta_head.feature_count"].item() == theirs["beta_head.feature_count"].item(), what
                for key in ours:
                    assert torch.allclose(ours[key], theirs[key], atol=SCORE_TOL), (what, key, ours, theirs)
                # It moved, so the comparison means something: the tanh head's offset (a sum over ranks), the
                # exp head's feature mean (the DPO default has no offset to move).
                moved = "beta_head.logit_offset" if values.get("beta_head_kind") == "tanh" else "beta_head.feature_mean"
                assert ours[moved].abs().max().item() > 0, (what, moved)
            if zero == 3:  # resumed from the ZeRO checkpoint at step 2: the same steps 3-4, the same final model
                resumed_losses = logged_losses(out + "_resume")
                for step in (3, 4):
                    assert abs(resumed_losses[step] - losses[step]) <= RESUME_TOL, (what, resumed_losses, losses)
                assert_close(record["fingerprints"][path.replace(".yaml", "_resume.yaml")], in_memory, RESUME_TOL,
                             what + " resumed")  # fmt: skip
            if name == "dpo_dynamic_beta":
                # The frozen reference: sharded under ZeRO-3 (an inference engine, as TRL prepares it), whole under 2.
                assert record["reference_sharded"][path] is (zero == 3), (what, record["reference_sharded"])
            if name == "dpo_precomputed":
                # Each rank ran the reference over its half of the 40 pairs (and never again: the run has no ref).
                halves = (record["reference_pairs"][path], record1["reference_pairs"][path])
                assert halves == (20, 20), (what, halves)


def test_one_process_started_without_a_launcher_runs_deepspeed_as_a_world_of_one(tmp_path):
    """`discoalign train` with `deepspeed:` in one plain process (no torchrun, no mpi4py): a world of one instead of
    DeepSpeed's MPI discovery, and ZeRO-2 logs the losses of the same run without DeepSpeed."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (`pip install 'discoalign[deepspeed]'`)")
    values = {**COMMON, **JOBS["rm_disco"], "model_name_or_path": "builtin:tiny-qwen3", "save_strategy": "no"}
    plain, zero2 = str(tmp_path / "plain"), str(tmp_path / "zero2")
    run_exp(load_config(write_yaml(tmp_path / "plain.yaml", {**values, "output_dir": plain})))
    path = write_yaml(tmp_path / "zero2.yaml",
                      {**values, "output_dir": zero2, "deepspeed": os.path.join(EXAMPLES, "ds_z2_config.json")})  # fmt: skip
    launched = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launched}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    cli = os.path.join(os.path.dirname(sys.executable), "discoalign")
    done = subprocess.run([cli, "train", str(path)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-4000:]
    ours, theirs = logged_losses(zero2), logged_losses(plain)
    assert ours.keys() == theirs.keys() and len(theirs) == STEPS and len(set(theirs.values())) > 1
    for step in theirs:
        assert abs(ours[step] - theirs[step]) <= LOSS_TOL, (step, ours, theirs)
