"""Issue 24: a run prints what a user can act on. DeepSpeed's "Setting accelerator to CPU", the tokenizer's length
warning, transformers' loading/writing progress bars and its special-token alignment notice were printed by every
run; `--verbose` shows them again.

A real subprocess per mode: what reaches the terminal (library loggers with their own handlers, Python warnings,
progress bars) is only seen from outside.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

NOISE = (
    "Setting accelerator to CPU",  # DeepSpeed, filtered (cli/quiet.py)
    "Token indices sequence length is longer",  # the tokenizer's warning, fixed at the source (models/loader.py)
    "Loading weights",  # transformers' progress bars, off unless --verbose
    "Writing model shards",
    "The tokenizer has new PAD/BOS/EOS tokens",  # the Trainer's alignment notice, done quietly (models/vocabulary.py)
)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A tiny RM run that triggers every entry of NOISE: rows longer than the model's 512 positions, `template`
    changing the EOS, a saved checkpoint reloaded by `score`."""
    root = tmp_path_factory.mktemp("quiet")
    long = " ".join(f"word{i % 40}" for i in range(600))
    rows = [{"prompt": f"{long} {i}", "chosen": "yes", "rejected": "no"} for i in range(4)]
    (root / "data.json").write_text(json.dumps(rows))
    (root / "run.yaml").write_text(yaml.safe_dump({
        "stage": "rm", "model_name_or_path": "builtin:tiny-qwen2", "dataset": "data.json", "template": "llama3",
        "cutoff_len": 600, "max_steps": 1, "per_device_train_batch_size": 2, "save_strategy": "no",
        "plot_loss": False, "output_dir": "out", "use_cpu": True, "disable_tqdm": True,
    }))  # fmt: skip
    return root


def discoalign(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "discoalign", *args], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip


def test_a_run_prints_no_noise_and_verbose_shows_it(run_dir):
    quiet = discoalign(run_dir, "train", "run.yaml")
    assert quiet.returncode == 0, quiet.stderr
    printed = quiet.stdout + quiet.stderr
    assert [n for n in NOISE if n in printed] == []
    assert "Traceback" not in printed and "`cutoff_len: 600` -> `cutoff_len: 512`" in printed
    loud = discoalign(run_dir, "train", "run.yaml", "output_dir=out2", "--verbose")
    assert loud.returncode == 0, loud.stderr
    printed = loud.stdout + loud.stderr
    shown = {"Writing model shards"}  # always shown with --verbose
    try:
        import deepspeed  # noqa: F401

        shown.add("Setting accelerator to CPU")
    except ImportError:
        pass
    assert [n for n in shown if n not in printed] == []
    assert "[discoalign] DEBUG" in printed  # our own debug lines


def test_the_filter_list_states_why(capsys):
    """Every filtered entry says why a user cannot act on it, and only the listed message is dropped."""
    import logging

    from discoalign.cli.quiet import LOG_NOISE, WARNING_NOISE, setup_output

    assert all(len(why) > 40 for *_, why in LOG_NOISE + WARNING_NOISE)
    setup_output(verbose=False)
    logger = logging.getLogger("DeepSpeed")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        logger.warning("Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.")
        logger.warning("a DeepSpeed warning that is not on the list")
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == ["a DeepSpeed warning that is not on the list"]
