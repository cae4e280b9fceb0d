"""The `discoalign` command: train, eval, score, tiny-model, help, and exit code 2 for user mistakes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from discoalign.cli.main import main

TINY_RM = {
    "stage": "rm",
    "model_name_or_path": "builtin:tiny-qwen2",
    "dataset": "builtin:synthetic",
    "eval_dataset": "builtin:synthetic",
    "synthetic_num_pairs": 48,
    "cutoff_len": 48,
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 16,
    "max_steps": 3,
    "logging_steps": 1,
    "save_strategy": "no",
    "add_disco_head": True,
    "disco_pref": True,
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    config = root / "rm.yaml"
    config.write_text(yaml.safe_dump(TINY_RM))
    out = root / "out"
    assert main(["train", str(config), f"output_dir={out}", "learning_rate=2e-3"]) == 0
    return root, config, out


def test_train_writes_the_full_output_layout(trained):
    _, _, out = trained
    for name in (
        "model.safetensors",
        "heads.safetensors",
        "heads_config.json",
        "discoalign_config.yaml",
        "tokenizer.json",
        "trainer_state.json",
        "predictions.jsonl",
        "plots/loss.png",
        "plots/reliability.png",
    ):
        assert (out / name).is_file(), name
    resolved = yaml.safe_load(open(out / "discoalign_config.yaml"))
    assert resolved["learning_rate"] == 2e-3 and resolved["disco_pref"] is True
    first = json.loads(open(out / "predictions.jsonl").readline())
    assert {"mean_chosen", "mean_rejected", "variance_chosen", "variance_rejected", "probability"} <= set(first)
    assert {"true_reward_chosen", "true_reward_rejected", "noise"} <= set(first)
    metrics = json.load(open(out / "eval_results.json"))
    for key in ("eval_accuracy", "eval_nll", "eval_brier", "eval_ece", "eval_variance_chosen", "eval_true_accuracy"):
        assert key in metrics, key


def test_eval_reproduces_the_metrics_of_the_trained_model(trained):
    root, config, out = trained
    eval_out = root / "eval"
    assert main(["eval", str(config), f"model_name_or_path={out}", f"output_dir={eval_out}"]) == 0
    before = json.load(open(out / "eval_results.json"))
    after = json.load(open(eval_out / "eval_results.json"))
    for key in ("eval_accuracy", "eval_nll", "eval_ece"):
        assert after[key] == pytest.approx(before[key], abs=1e-6), key


def test_score_writes_mean_and_variance_per_response(trained, tmp_path):
    _, _, out = trained
    data = tmp_path / "pairs.jsonl"
    rows = [
        {"prompt": "Topic: food. Describe a cake.", "chosen": "bright calm", "rejected": "dull slow"},
        {"prompt": "Topic: food. Describe a pie.", "chosen": "warm kind", "rejected": "cold rude"},
    ]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    scores = tmp_path / "scores.jsonl"
    assert main(["score", "--model", str(out), "--data", str(data), "--out", str(scores)]) == 0
    lines = [json.loads(line) for line in open(scores)]
    assert [(l["index"], l["response"]) for l in lines] == [
        (0, "chosen"),
        (0, "rejected"),
        (1, "chosen"),
        (1, "rejected"),
    ]
    assert all(l["variance"] > 0 for l in lines)
    # scoring a response alone gives the same mean as in the batch (right padding, last real token)
    import torch

    from discoalign.config.schema import FinetuningArguments, ModelArguments
    from discoalign.models.loader import load_model_with_heads

    model, tok = load_model_with_heads(
        ModelArguments(model_name_or_path=str(out)),
        FinetuningArguments(stage="rm", add_disco_head=True),
        add_value_head=True,
        is_trainable=False,
    )
    model.eval()
    ids = tok.apply_chat_template(
        [{"role": "user", "content": rows[1]["prompt"]}, {"role": "assistant", "content": rows[1]["rejected"]}],
        tokenize=True,
    )
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    t = torch.tensor([ids])
    mean, var = model.score(t, torch.ones_like(t), with_variance=True)
    assert lines[3]["mean"] == pytest.approx(mean.item(), abs=1e-5)
    assert lines[3]["variance"] == pytest.approx(var.item(), abs=1e-5)


def test_user_mistakes_exit_2_with_one_paragraph(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({**TINY_RM, "pref_bta": 0.1}))
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "Did you mean `pref_beta`" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1

    bad_data = tmp_path / "bad.jsonl"
    bad_data.write_text(json.dumps({"prompt": "p", "chosen": "same", "rejected": "same"}) + "\n")
    config.write_text(yaml.safe_dump({**TINY_RM, "dataset": str(bad_data), "eval_dataset": None}))
    assert main(["train", str(config), f"output_dir={tmp_path / 'o'}"]) == 2
    err = capsys.readouterr().err
    assert str(bad_data) in err and "row 0" in err and "Traceback" not in err

    assert main(["score", "--model", str(tmp_path / "nope"), "--data", str(bad_data), "--out", "x.jsonl"]) == 2


def test_tiny_model_command_writes_a_loadable_model(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert main(["tiny-model", "--arch", "gpt2", "--out", str(tmp_path / "g")]) == 0
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "g"))
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "g"))
    assert model.config.hidden_size == 64 and tok.chat_template


def test_help_of_each_command(capsys):
    """The real entry point once (`python -m discoalign --help`), then each command's help through `main`."""
    proc = subprocess.run([sys.executable, "-m", "discoalign", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "usage: discoalign" in proc.stdout, proc.stderr
    for cmd in (["train"], ["eval"], ["score"], ["tiny-model"], ["demo"]):
        with pytest.raises(SystemExit) as exit_info:
            main([*cmd, "--help"])
        assert exit_info.value.code == 0
        assert f"usage: discoalign {cmd[0]}" in capsys.readouterr().out
