"""Issue 24: what a user from LlamaFactory or TRL hit on the first day, each reproduced and fixed.

Error paths end in one paragraph and exit code 2 (before any model loads where the config tells); the logged
accuracy survives a micro-batch of ties; the final evaluation reaches trainer_state.json and the plots; `score`
speaks of its own flag and rows and keeps what joins its output back to the input.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import yaml
from helpers import log_history

from discoalign.cli.main import main
from discoalign.config import build_config
from discoalign.config.schema import FinetuningArguments, ModelArguments

TINY_RM = {
    "stage": "rm",
    "model_name_or_path": "builtin:tiny-qwen2",
    "dataset": "builtin:synthetic",
    "synthetic_num_pairs": 16,
    "cutoff_len": 48,
    "per_device_train_batch_size": 4,
    "max_steps": 1,
    "save_strategy": "no",
    "plot_loss": False,
    "use_cpu": True,
    "disable_tqdm": True,
}


def run(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


def one_paragraph(err: str) -> bool:
    return err.count("discoalign: error:") == 1 and len(err.strip().splitlines()) == 1


@pytest.fixture
def no_model(monkeypatch):
    import discoalign.models.loader as loader

    def refuse(*args, **kwargs):
        raise AssertionError("a model/tokenizer was loaded before the mistake was reported")

    monkeypatch.setattr(loader, "load_tokenizer", refuse)


def write(path, **changes) -> str:
    path.write_text(yaml.safe_dump({**TINY_RM, **changes}))
    return str(path)


def test_eval_strategy_without_eval_data(tmp_path, capsys, no_model):
    """Was a transformers ValueError traceback (exit 1) after the model and data loaded."""
    config = write(tmp_path / "run.yaml", output_dir=str(tmp_path / "out"), eval_strategy="steps", eval_steps=1)
    code, err = run(capsys, "train", config)
    assert code == 2 and one_paragraph(err), err
    assert "`eval_strategy: steps`" in err and "`eval_dataset`" in err and "`val_size`" in err


def test_push_to_hub_offline_names_offline_mode(tmp_path, capsys, no_model):
    """Was "cannot write or read ... Free space or fix the permissions" after training."""
    config = write(tmp_path / "run.yaml", output_dir=str(tmp_path / "out"), push_to_hub=True)
    code, err = run(capsys, "train", config)
    assert code == 2 and one_paragraph(err), err
    assert "offline mode" in err and "HF_HUB_OFFLINE" in err and "permissions" not in err


def test_logged_accuracy_leaves_out_a_micro_batch_of_ties(tmp_path):
    """The accuracy of a micro-batch whose pairs all tie is NaN (no decided pair); the interval's logged mean was
    NaN too (sum/len). Now the mean is over the decided micro-batches, and a key with none is not logged."""
    from discoalign.train.rm.workflow import RMWorkflow

    cfg = build_config({**TINY_RM, "output_dir": str(tmp_path)})
    trainer, _ = RMWorkflow().build_trainer(cfg)
    trainer.store_metrics({"accuracy": float("nan"), "margin": 0.0})
    for accuracy in (1.0, 0.0, 1.0):
        trainer.store_metrics({"accuracy": accuracy, "margin": 0.5})
    trainer.log({"loss": 0.7})
    logged = trainer.state.log_history[-1]
    assert logged["accuracy"] == pytest.approx(2 / 3) and logged["margin"] == pytest.approx(0.375)
    trainer.store_metrics({"accuracy": float("nan")})
    trainer.log({"loss": 0.7})
    assert "accuracy" not in trainer.state.log_history[-1]
    assert not any(isinstance(v, float) and math.isnan(v) for e in trainer.state.log_history for v in e.values())


def test_rm_final_evaluation_is_in_trainer_state_and_plots(tmp_path, monkeypatch):
    import discoalign.train.base_trainer as base_trainer
    from discoalign.train.tuner import run_exp

    plotted, plot = {}, base_trainer.plot_history

    def recording(history, keys, path, title):
        plotted[os.path.basename(path)] = {k for k in keys if any(k in entry for entry in history)}
        return plot(history, keys, path, title)

    monkeypatch.setattr(base_trainer, "plot_history", recording)
    out = tmp_path / "rm"
    results = run_exp(build_config({**TINY_RM, "output_dir": str(out), "val_size": 4, "do_train": True, "do_eval": True,
                                    "max_steps": 2, "plot_loss": True}))  # fmt: skip
    final = log_history(out)[-1]
    assert final["step"] == 2 and final["eval_accuracy"] == results["eval"]["eval_accuracy"]
    assert "eval_accuracy" in plotted["accuracy.png"] and "eval_loss" in plotted["loss.png"]


# ---- discoalign score -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory):
    """A tiny reward model (ChatML template: responses end in `<|im_end|>\\n`) with random heads."""
    from discoalign.models.checkpoint import save_checkpoint
    from discoalign.models.loader import load_model_with_heads

    model, tok = load_model_with_heads(ModelArguments(model_name_or_path="builtin:tiny-qwen3"),
                                       FinetuningArguments(head_init_std=0.5), add_value_head=True)  # fmt: skip
    model.heads_config["value_head_kind"] = "reward"
    return save_checkpoint(model, str(tmp_path_factory.mktemp("score") / "rm"), tokenizer=tok)


def test_score_row_error_names_the_flag(tmp_path, capsys, reward_dir):
    rows = [{"id": "a1", "prompt": "Which colour?", "chosen": "Blue.", "rejected": "Grey."},
            {"id": "a2", "prompt": "Which fruit?", "chosen": None, "rejected": "Stone."}]  # fmt: skip
    data = tmp_path / "pairs.json"
    data.write_text(json.dumps(rows))
    code, err = run(capsys, "score", "--model", reward_dir, "--data", str(data), "--out", str(tmp_path / "s.jsonl"))
    assert code == 2 and one_paragraph(err), err
    assert "pass --skip-invalid-rows" in err and "skip_invalid_rows: true" not in err
    assert "row 1" in err and "field `chosen`" in err and "the value is null" in err
    assert "the field is missing or null" not in err


def test_pairwise_score_output_joins_back_to_its_rows(tmp_path, capsys, caplog, reward_dir):
    import logging

    rows = [{"id": "a1", "prompt": "Which colour?", "chosen": "Blue.\n", "rejected": "Grey.", "topic": "art"},
            {"id": "a2", "prompt": "Which fruit?", "chosen": "Apple.", "rejected": "Stone."}]  # fmt: skip
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "s.jsonl"
    with caplog.at_level(logging.INFO, logger="discoalign"):
        code, _ = run(capsys, "score", "--model", reward_dir, "--data", str(data), "--out", str(out))
    assert code == 0
    assert "Data: 2 rows to score." in caplog.text and "training rows" not in caplog.text
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["id"], r["response"], r["prompt"], r["text"]) for r in lines] == [
        ("a1", "chosen", "Which colour?", "Blue.\n"),
        ("a1", "rejected", "Which colour?", "Grey."),
        ("a2", "chosen", "Which fruit?", "Apple."),
        ("a2", "rejected", "Which fruit?", "Stone."),
    ]  # fmt: skip  (the row's own text: "Blue.\n" keeps its newline, no template's "\n" is added)
    assert lines[0]["topic"] == "art" and "topic" not in lines[2]
    assert all(isinstance(r["mean"], float) for r in lines)
    assert torch.tensor([r["mean"] for r in lines]).unique().numel() == 4
