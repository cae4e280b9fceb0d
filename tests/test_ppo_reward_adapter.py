"""One base for the whole PPO loop: a LoRA reward adapter loaded as a second named adapter on the LoRA policy's base
scores exactly like the same adapter on its own copy of the base, leaves the policy and its reference untouched,
holds no base weights of its own, and refuses an adapter trained on another base."""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import scoring_batch, train_logs

from discoalign.config import build_config
from discoalign.config.schema import FinetuningArguments, ModelArguments
from discoalign.errors import ConfigError
from discoalign.models.checkpoint import save_checkpoint
from discoalign.models.loader import load_model_with_heads
from discoalign.models.reward_adapter import SharedBaseRewardModel
from discoalign.models.reward_model import load_reward_model, score_responses
from discoalign.train.tuner import run_exp

BASE = "builtin:tiny-qwen3"


def _perturb(module: torch.nn.Module, pattern: str, seed: int, scale: float = 0.1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if pattern in name:
                param.copy_(torch.randn(param.shape, generator=gen) * scale)


def _lora_model(base: str, seed: int, disco: bool, value_head: bool = True):
    torch.manual_seed(seed)
    model, tok = load_model_with_heads(
        ModelArguments(model_name_or_path=base),
        FinetuningArguments(finetuning_type="lora", lora_rank=4, add_disco_head=disco),
        add_value_head=value_head,
    )
    _perturb(model, "lora_B", seed)  # LoRA B starts at 0: make the adapter change the outputs
    if disco:
        _perturb(model.variance_head, "weight", seed + 1, 0.3)
    return model, tok


@pytest.fixture(scope="module")
def reward_adapters(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("rm-adapters")
    out = {}
    for name, base, disco in (("disco", BASE, True), ("scalar", BASE, False), ("llama", "builtin:tiny-llama", False)):
        model, tok = _lora_model(base, seed=11, disco=disco)
        out[name] = save_checkpoint(model, str(root / name), tok)
    return out


def _args(reward_model: str, **ft):
    return FinetuningArguments(stage="ppo", finetuning_type="lora", reward_model=reward_model, **ft)


@pytest.mark.parametrize("kind", ["disco", "scalar"])
def test_shared_base_scores_equal_the_separate_base_and_leave_the_policy_alone(reward_adapters, kind):
    policy, tok = _lora_model(BASE, seed=3, disco=False)
    policy.train()
    model_args = ModelArguments(model_name_or_path=BASE)
    ft = _args(reward_adapters[kind], reward_model_type="lora")
    separate = load_reward_model(model_args, ft, tok)  # no policy given: the adapter on its own copy of the base
    batch = scoring_batch(tok)
    input_ids = torch.cat([batch[0], batch[2]], 1)
    mask = torch.cat([batch[1], batch[3]], 1).long()
    with torch.no_grad():
        policy_before = policy.hidden_states(input_ids, mask)
        with policy.disable_adapter():
            reference_before = policy.hidden_states(input_ids, mask)
    grads_before = {n: p.requires_grad for n, p in policy.named_parameters()}

    shared = load_reward_model(model_args, ft, tok, policy=policy)
    assert isinstance(shared, SharedBaseRewardModel) and shared.adapter_name == "reward"
    mean_s, var_s = score_responses(shared, *batch)
    mean_r, var_r = score_responses(separate, *batch)
    torch.testing.assert_close(mean_s, mean_r, rtol=0, atol=1e-5)
    if kind == "disco":
        torch.testing.assert_close(var_s, var_r, rtol=0, atol=1e-5)
        assert (var_s - var_s.mean()).abs().max() > 1e-3  # the variance head really varies
    else:
        assert var_s is None and var_r is None
    # The reward adapter really changes the scores: the policy's adapter would give other hidden states.
    assert (mean_s - policy.value_head(policy_before[:, -1].float())).abs().max() > 1e-3

    assert policy.backbone.active_adapter == "default" and policy.training
    assert {n: p.requires_grad for n, p in policy.named_parameters() if ".reward." not in n} == grads_before
    assert not any(p.requires_grad for n, p in policy.named_parameters() if ".reward." in n)
    with torch.no_grad():
        torch.testing.assert_close(policy.hidden_states(input_ids, mask), policy_before, rtol=0, atol=0)
        with policy.disable_adapter():
            torch.testing.assert_close(policy.hidden_states(input_ids, mask), reference_before, rtol=0, atol=0)


def test_the_shared_reward_model_holds_no_base_weights(reward_adapters, tmp_path):
    policy, tok = _lora_model(BASE, seed=3, disco=False)
    model_args = ModelArguments(model_name_or_path=BASE)
    ft = _args(reward_adapters["disco"], reward_model_type="lora")
    separate = load_reward_model(model_args, ft, tok)
    shared = load_reward_model(model_args, ft, tok, policy=policy)
    hidden = policy.config.hidden_size
    assert sum(p.numel() for p in shared.parameters()) == 2 * (hidden + 1)  # value + variance head only
    from discoalign.models.tiny import build_tiny_model

    base_numel = sum(p.numel() for p in build_tiny_model("qwen3").parameters())
    separate_base = [p for n, p in separate.named_parameters() if "lora_" not in n and not n.startswith(
        ("value_head.", "variance_head."))]  # fmt: skip
    assert sum(p.numel() for p in separate_base) == base_numel  # the copy of the base the shared path does not make
    # The policy's checkpoint holds its own adapter only, not the reward adapter it carries.
    out = save_checkpoint(policy, str(tmp_path / "policy"), tok)
    assert not os.path.exists(os.path.join(out, "reward"))
    from safetensors.torch import load_file

    keys = load_file(os.path.join(out, "adapter_model.safetensors"))
    assert keys and not any(".reward." in k for k in keys)


def test_an_adapter_trained_on_another_base_is_refused(reward_adapters):
    policy, tok = _lora_model(BASE, seed=3, disco=False)
    ft = _args(reward_adapters["llama"], reward_model_type="lora")
    with pytest.raises(ConfigError) as info:
        load_reward_model(ModelArguments(model_name_or_path=BASE), ft, tok, policy=policy)
    message = str(info.value)
    assert "builtin:tiny-llama" in message and BASE in message and "reward_model_type: full" in message
    assert "reward" not in policy.backbone.peft_config  # nothing was loaded


def _ppo(tmp_path, reward_model: str, reward_model_type: str):
    return build_config({
        "stage": "ppo", "model_name_or_path": BASE, "finetuning_type": "lora", "lora_rank": 4,
        "reward_model": reward_model, "reward_model_type": reward_model_type, "dataset": "builtin:synthetic",
        "synthetic_num_pairs": 16, "max_new_tokens": 5, "per_device_train_batch_size": 4, "ppo_epochs": 1,
        "max_steps": 2, "logging_steps": 1, "learning_rate": 5e-3, "output_dir": str(tmp_path),
        "save_strategy": "no", "do_train": True, "disable_tqdm": True, "num_score_samples": 0, "seed": 0,
    })  # fmt: skip


@pytest.mark.slow
def test_ppo_with_the_reward_adapter_on_the_policy_base_trains_like_the_two_base_run(tmp_path, reward_adapters):
    # `reward_model_type: full` loads the same adapter on its own copy of the base (today's two-base path).
    run_exp(_ppo(tmp_path / "shared", reward_adapters["disco"], "lora"))
    run_exp(_ppo(tmp_path / "separate", reward_adapters["disco"], "full"))
    logs = {}
    for name in ("shared", "separate"):
        logs[name] = train_logs(tmp_path / name)
    assert len(logs["shared"]) == len(logs["separate"]) == 2
    for shared, separate in zip(logs["shared"], logs["separate"]):
        for key in ("objective/scores", "reward/variance", "objective/kl", "loss/policy", "val/vf_loss"):
            assert shared[key] == pytest.approx(separate[key], rel=1e-4, abs=1e-5), key
    assert not (tmp_path / "shared" / "reward").exists()


LAUNCHER = """
import hashlib, json, os, sys

from discoalign.config import load_config
from discoalign.train.ppo.workflow import build_ppo_trainer
from transformers import set_seed

cfg = load_config(sys.argv[2])
set_seed(cfg.training.seed)
trainer, _ = build_ppo_trainer(cfg)
trainer.train()
digest = hashlib.sha256()
for name, tensor in sorted(trainer._policy().state_dict().items()):
    digest.update(name.encode())
    digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
with open(f"{sys.argv[1]}.rank{os.environ['RANK']}", "w") as f:
    json.dump({"digest": digest.hexdigest(), "adapter": trainer._policy().backbone.active_adapter}, f)
from discoalign.train.distributed import shutdown_process_group

shutdown_process_group()  # a clean exit: gloo threads torn down at interpreter exit can abort a rank
"""


@pytest.mark.slow
def test_two_processes_with_the_shared_reward_adapter_stay_in_sync(tmp_path, reward_adapters):
    import shutil
    import subprocess
    import sys

    import yaml

    if shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None:
        pytest.skip("torchrun is not installed beside this Python")
    raw = {
        "stage": "ppo", "model_name_or_path": BASE, "finetuning_type": "lora", "lora_rank": 4,
        "reward_model": reward_adapters["disco"], "reward_model_type": "lora", "disco_risk_coef": 0.5,
        "dataset": "builtin:synthetic", "synthetic_num_pairs": 32, "max_new_tokens": 5,
        "per_device_train_batch_size": 4, "ppo_epochs": 2, "max_steps": 2, "logging_steps": 1,
        "learning_rate": 5e-3, "use_cpu": True, "do_train": True, "disable_tqdm": True, "save_strategy": "no",
        "seed": 3, "plot_loss": False, "output_dir": str(tmp_path / "out"),
    }  # fmt: skip
    config = tmp_path / "ppo.yaml"
    config.write_text(yaml.safe_dump(raw))
    launcher = tmp_path / "launcher.py"
    launcher.write_text(LAUNCHER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", str(launcher), str(tmp_path / "fp"), str(config)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    rank0 = json.loads((tmp_path / "fp.rank0").read_text())
    rank1 = json.loads((tmp_path / "fp.rank1").read_text())
    # Each rank scores its own rollouts with the reward adapter; DDP keeps the policies (and their adapters) equal.
    assert rank0 == rank1 and rank0["adapter"] == "default"
