"""Small things a user reaches for: `--version`, where each prediction came from, `report_to: tensorboard`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_version(capsys):
    from discoalign.cli.main import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    version = re.search(r'^version = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert capsys.readouterr().out.strip() == f"discoalign {version}"


def test_predictions_carry_source_row_and_prompt(tmp_path):
    from discoalign.config import build_config
    from discoalign.train.tuner import run_exp

    rows = [{"prompt": f"Question number {i}?", "chosen": f"Good answer {i}.", "rejected": f"Bad {i}."}
            for i in range(12)]  # fmt: skip
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "rm"
    run_exp(build_config(dict(stage="rm", model_name_or_path="builtin:tiny-qwen3", dataset=str(data), val_size=5,
                              max_steps=1, per_device_train_batch_size=4, output_dir=str(out), do_train=True,
                              do_eval=True, save_strategy="no", plot_loss=False, disable_tqdm=True)))  # fmt: skip
    predictions = [json.loads(line) for line in open(out / "predictions.jsonl")]
    assert len(predictions) == 5
    assert len({p["source_row"] for p in predictions}) == 5  # the split shuffles, the ids still point home
    for p in predictions:
        assert p["source"] == str(data)
        assert p["prompt"] == [{"role": "user", "content": rows[p["source_row"]]["prompt"]}]


def test_report_to_tensorboard_writes_events(tmp_path):
    pytest.importorskip("tensorboard", reason="the `tensorboard` extra is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from discoalign.config import build_config
    from discoalign.train.tuner import run_exp

    out = tmp_path / "out"
    run_exp(build_config(dict(stage="sft", model_name_or_path="builtin:tiny-qwen3", dataset="builtin:synthetic",
                              synthetic_num_pairs=32, cutoff_len=48, max_steps=2, logging_steps=1,
                              per_device_train_batch_size=8, report_to="tensorboard", output_dir=str(out), do_train=True, save_strategy="no", plot_loss=False,
                              disable_tqdm=True)))  # fmt: skip
    events = list((out / "runs").rglob("events.out.tfevents.*"))  # transformers' default: output_dir/runs/<date>
    assert events
    accumulator = EventAccumulator(str(events[0].parent))
    accumulator.Reload()
    assert len(accumulator.Scalars("train/loss")) == 2


def test_report_to_tensorboard_without_the_package_names_the_extra(monkeypatch):
    import importlib.util

    from discoalign.config import build_config
    from discoalign.errors import ConfigError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("tensorboard") else real(name, *a))  # fmt: skip
    with pytest.raises(ConfigError, match=r"pip install 'discoalign\[tensorboard\]'"):
        build_config({"stage": "sft", "dataset": "builtin:synthetic", "report_to": "tensorboard"})
