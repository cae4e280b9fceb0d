"""examples/pipeline/run.sh, shortened: SFT -> RM -> PPO and SFT -> DPO, each step's output the next step's input.

The commands are read from run.sh itself (so the documented sequence is what runs) and run through the CLI's
`main` in a scratch working directory, with key=value overrides that shrink each step to a few optimiser steps.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
RUN_SH = ROOT / "examples" / "pipeline" / "run.sh"
SHARED_DATA = ROOT.parent / "shared" / "data"  # as tests/conftest.py finds it

SHORT = {
    "1_sft.yaml": "max_steps=4 synthetic_num_pairs=64 per_device_train_batch_size=16",
    "2_rm.yaml": "max_steps=3 synthetic_num_pairs=64 per_device_train_batch_size=16",
    "3_ppo.yaml": "max_steps=1 synthetic_num_pairs=64 max_samples=16 per_device_train_batch_size=4 ppo_buffer_size=1 "
    "ppo_epochs=1 per_device_eval_batch_size=16 max_new_tokens=6",
    "4_dpo.yaml": "max_steps=2 synthetic_num_pairs=64 per_device_train_batch_size=8",
    "5_sft_alpaca.yaml": "max_steps=2 max_samples=16 cutoff_len=128",
    "6_dpo_en_demo.yaml": "max_steps=2 max_samples=12 val_size=4 cutoff_len=128",
}
SHARED_STEPS = ("5_sft_alpaca", "sft_alpaca", "6_dpo_en_demo")


def commands() -> list[list[str]]:
    """The `$DISCOALIGN ...` lines of run.sh (comments and `serve`, which blocks, left out)."""
    lines = [line.strip() for line in RUN_SH.read_text().splitlines()]
    return [shlex.split(line)[1:] for line in lines if line.startswith("$DISCOALIGN ")]


def test_run_sh_names_every_pipeline_config():
    named = {Path(argv[1]).name for argv in commands() if argv[0] == "train"}
    assert named == set(SHORT) == {p.name for p in (ROOT / "examples" / "pipeline").glob("*.yaml")}


@pytest.mark.slow
def test_pipeline_runs_end_to_end(tmp_path, monkeypatch, capsys):
    from discoalign.cli.main import main

    work = tmp_path / "work"
    work.mkdir()
    (work / "examples").symlink_to(ROOT / "examples")
    has_shared = SHARED_DATA.is_dir()
    if has_shared:
        (tmp_path / "shared").mkdir()
        (tmp_path / "shared" / "data").symlink_to(SHARED_DATA)
    monkeypatch.chdir(work)
    ran = []
    for argv in commands():
        if not has_shared and any(step in " ".join(argv) for step in SHARED_STEPS):
            continue  # ../shared/data is absent: the built-in half still runs
        if argv[0] == "train":
            argv = argv + SHORT[Path(argv[1]).name].split() + ["disable_tqdm=true", "plot_loss=false"]
        assert main(argv) == 0, argv
        ran.append(argv[1] if argv[0] == "train" else argv[0])
    out = capsys.readouterr().out
    saves = work / "saves" / "pipeline"

    # each step read the previous step's output
    def config(step: str) -> dict:
        return yaml.safe_load((saves / step / "discoalign_config.yaml").read_text())

    assert config("rm")["model_name_or_path"] == "saves/pipeline/sft"
    assert config("ppo")["model_name_or_path"] == "saves/pipeline/sft"
    assert config("ppo")["reward_model"] == "saves/pipeline/rm"
    assert config("dpo")["model_name_or_path"] == "saves/pipeline/sft"
    heads = json.loads((saves / "rm" / "heads_config.json").read_text())
    assert heads["value_head"] and heads["variance_head"]
    ppo = json.loads((saves / "ppo" / "all_results.json").read_text())
    assert "eval_reward/variance" in ppo  # PPO scored its rollouts with the Disco reward model
    assert (saves / "rm_seq_cls" / "config.json").is_file() and "seq_cls" in out
    if has_shared:
        assert "LoRA merged" in out  # the LoRA SFT model was merged before DPO
        assert not (saves / "sft_alpaca_merged" / "adapter_config.json").exists()
        adapter = json.loads((saves / "dpo_en_demo" / "adapter_config.json").read_text())
        assert re.search(r"sft_alpaca_merged$", adapter["base_model_name_or_path"])
        assert config("dpo_en_demo")["dataset"] == "dpo_en_demo"
    assert len(ran) == (8 if has_shared else 5)
    assert os.getcwd() == str(work)
    print("ran:", ran)
