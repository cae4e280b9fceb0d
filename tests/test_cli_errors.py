"""Issue 11: every way a run can be misconfigured ends in a one-paragraph error and exit code 2, before any
model loads when the config alone tells; never in a traceback or in exit 0 after training on garbage.

Most cases call `discoalign.cli.main.main([...])` in-process (a subprocess costs seconds of imports); two real
subprocess runs at the end prove that nothing prints a traceback.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from discoalign.cli.main import main

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
}
GOOD = {"prompt": "Which is right?", "chosen": "The right one.", "rejected": "The wrong one."}


def write_config(path, **changes) -> str:
    raw = dict(TINY_RM)
    raw.update(changes)
    raw = {k: v for k, v in raw.items() if v is not None}
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return str(path)


def run(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if any model or tokenizer starts loading."""
    import discoalign.models.loader as loader

    def refuse(*args, **kwargs):
        raise AssertionError("a model/tokenizer was loaded before the mistake was reported")

    monkeypatch.setattr(loader, "load_tokenizer", refuse)


CONFIG_MISTAKES = [
    ({"per_device_train_batch_size": 0}, "`per_device_train_batch_size` is 0"),
    ({"max_steps": 2.5}, "`max_steps`"),
    ({"max_steps": -3}, "`max_steps` is -3"),
    ({"max_steps": 0}, "`max_steps` is 0"),
    ({"stage": None}, "no `stage` key"),
    ({"template": "qwen9"}, "`template`"),
    ({"dataset_dir": "mydata"}, "`dataset_dir`"),
    ({"max_prompt_length": 16}, "`max_prompt_length`"),
    ({"logging_dir": "logs"}, "TENSORBOARD_LOGGING_DIR"),
    ({"gradient_accumulation_steps": 0}, "`gradient_accumulation_steps` is 0"),
    ({"report_to": "nonsense"}, "`report_to: nonsense`"),
    ({"dataset": None}, "no training data"),
    ({"overwrite_output_dir": True, "resume_from_checkpoint": "ckpt"}, "would delete the checkpoints"),
    ({"lora_dropout": 1.5}, "`lora_dropout` is 1.5"),
    ({"overwrite_output_dir": True, "model_name_or_path": "OUT"}, "would delete the model this run loads"),
]


@pytest.mark.parametrize("changes, message", CONFIG_MISTAKES, ids=[m for _, m in CONFIG_MISTAKES])
def test_config_mistakes_fail_before_any_model_loads(tmp_path, capsys, no_model, changes, message):
    changes = {k: str(tmp_path / "out") if v == "OUT" else v for k, v in changes.items()}
    config = write_config(tmp_path / "run.yaml", output_dir=str(tmp_path / "out"), **changes)
    code, err = run(capsys, "train", config)
    assert code == 2
    assert message in err and "run.yaml" in err, err
    assert err.count("discoalign: error:") == 1 and len(err.strip().splitlines()) == 1  # one paragraph


def test_report_to_without_its_package(tmp_path, capsys, no_model, monkeypatch):
    import transformers.integrations.integration_utils as integrations

    monkeypatch.setattr(integrations, "get_available_reporting_integrations", lambda: [])  # as if not installed
    config = write_config(tmp_path / "run.yaml", output_dir=str(tmp_path / "out"), report_to="tensorboard")
    code, err = run(capsys, "train", config)
    assert code == 2 and "needs the `tensorboard` package" in err and "report_to: none" in err


def test_aliases_with_an_exact_equivalent_are_read_with_a_note(tmp_path, monkeypatch, caplog):
    import discoalign.train.tuner as tuner

    seen = {}
    monkeypatch.setattr(tuner, "run_exp", lambda cfg, callbacks=None: seen.setdefault("cfg", cfg))
    config = write_config(tmp_path / "run.yaml", stage="dpo", output_dir=str(tmp_path / "out"), max_length=40,
                          cutoff_len=None, ref_model="builtin:tiny-qwen2", beta=0.3)  # fmt: skip
    assert main(["train", config]) == 0
    cfg = seen["cfg"]
    assert cfg.data.cutoff_len == 40 and cfg.finetuning.pref_beta == 0.3
    assert cfg.model.ref_model_name_or_path == "builtin:tiny-qwen2"
    from discoalign.config.compat import notice

    text = notice(cfg.key_notes, cfg.source)
    assert "`max_length: 40` -> `cutoff_len: 40`: TRL's name." in text
    assert "`ref_model: builtin:tiny-qwen2` -> `ref_model_name_or_path: builtin:tiny-qwen2`: LlamaFactory's" in text


def test_output_dir_that_cannot_be_written(tmp_path, capsys, no_model):
    a_file = tmp_path / "taken"
    a_file.write_text("not a folder")
    config = write_config(tmp_path / "run.yaml")
    code, err = run(capsys, "train", config, f"output_dir={a_file}")
    assert code == 2 and "is an existing file" in err and str(a_file) in err
    code, err = run(capsys, "train", config, "output_dir=/proc/discoalign-out")
    assert code == 2 and "cannot be written" in err and "/proc/discoalign-out" in err


def test_resume_from_a_checkpoint_that_does_not_exist(tmp_path, capsys, no_model):
    config = write_config(tmp_path / "run.yaml", output_dir=str(tmp_path / "out"))
    code, err = run(capsys, "train", config, "resume_from_checkpoint=true")
    assert code == 2 and "holds no checkpoint-* folder" in err
    code, err = run(capsys, "train", config, f"resume_from_checkpoint={tmp_path / 'nope'}")
    assert code == 2 and "is not a folder" in err and str(tmp_path / "nope") in err


def test_used_output_dir_is_refused_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "out"
    config = write_config(tmp_path / "run.yaml", output_dir=str(out))
    assert run(capsys, "train", config)[0] == 0
    (out / "checkpoint-99").mkdir()  # stale, from "an earlier run"
    (out / "notes.txt").write_text("mine")  # not ours: never deleted
    code, err = run(capsys, "train", config)
    assert code == 2 and "already holds a run" in err and "overwrite_output_dir: true" in err
    assert run(capsys, "train", config, "overwrite_output_dir=true")[0] == 0
    assert not (out / "checkpoint-99").exists() and (out / "notes.txt").read_text() == "mine"
    assert (out / "heads.safetensors").is_file() and (out / "discoalign_config.yaml").is_file()
    # Evaluating into a trained model's folder is the documented flow: no refusal.
    assert run(capsys, "eval", config, f"model_name_or_path={out}", "eval_dataset=builtin:synthetic")[0] == 0


def test_model_folder_without_tokenizer(tmp_path, capsys, tiny_dirs):
    folder = tmp_path / "no_tokenizer"
    shutil.copytree(tiny_dirs["qwen2"], folder)
    for name in os.listdir(folder):
        if "token" in name or name in ("vocab.json", "merges.txt", "chat_template.jinja"):
            os.remove(folder / name)
    config = write_config(tmp_path / "run.yaml", output_dir=str(tmp_path / "out"), model_name_or_path=str(folder))
    code, err = run(capsys, "train", config)
    assert code == 2 and str(folder) in err and "has no tokenizer" in err and "tokenizer.json" in err


def test_write_failure_at_the_final_save_names_the_path_and_keeps_the_checkpoint(tmp_path, capsys, monkeypatch):
    import discoalign.models.checkpoint as checkpoint

    real_save = checkpoint.save_checkpoint

    def save(model, output_dir, **kwargs):
        if "checkpoint-" not in os.path.basename(output_dir):  # the folder became read-only after the last checkpoint
            raise OSError(30, "Read-only file system", os.path.join(output_dir, "model.safetensors"))
        return real_save(model, output_dir, **kwargs)

    monkeypatch.setattr(checkpoint, "save_checkpoint", save)
    out = tmp_path / "out"
    config = write_config(tmp_path / "run.yaml", output_dir=str(out), max_steps=2, save_strategy="steps", save_steps=1)
    code, err = run(capsys, "train", config)
    assert code == 2
    assert str(out / "model.safetensors") in err and "Read-only file system" in err
    assert "checkpoint-2" in err and "resume_from_checkpoint" in err
    assert (out / "checkpoint-2" / "heads.safetensors").is_file()


def test_data_mistakes_name_file_row_and_field(tmp_path, capsys, caplog):
    """The data rows of the table, through `discoalign train` (the model loads first: the tokenizer is needed)."""
    data = tmp_path / "data"
    data.mkdir()
    lines = lambda rows: "\n".join(json.dumps(r, ensure_ascii=False) for r in rows)  # noqa: E731
    sharegpt = {"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt", "value": "a"},
                "rejected": {"from": "gpt", "value": "b"}}  # fmt: skip
    user_reply = dict(GOOD, chosen=[{"role": "user", "content": "Me again"}])
    (data / "role.jsonl").write_text(lines([GOOD, user_reply]))
    (data / "mixed.jsonl").write_text(lines([GOOD] * 3 + [sharegpt]))
    (data / "latin1.jsonl").write_bytes(lines([GOOD]).encode() + b'\n{"prompt": "caf\xe9"}\n')
    many = [dict(GOOD) for _ in range(40)]
    for i in (3, 9, 17, 20, 31, 35):
        many[i]["chosen"] = ""
    many[5]["prompt"] = None
    (data / "many.jsonl").write_text(lines(many))
    expected = {
        "role.jsonl": ["row 1 (0-based)", "`chosen[0].role`", "'user'"],
        "mixed.jsonl": ["row 3 (0-based)", "`sharegpt`", "`pairwise`"],
        "latin1.jsonl": ["line 2 is not UTF-8", "0xe9"],
        "many.jsonl": ["row 3 (0-based)", "7 of 40 rows are invalid", "empty response: 6 (rows 3, 9, 17, 20, 31, ...)",
                       "missing or null field: 1 (row 5)"],
    }  # fmt: skip
    for name, parts in expected.items():
        config = write_config(tmp_path / "run.yaml", output_dir=str(tmp_path / name), dataset=str(data / name))
        code, err = run(capsys, "train", config)
        assert code == 2, name
        assert str(data / name) in err and all(p in err for p in parts), err

    # Accepted: a BOM; an unreadable JSONL line skipped and counted; short cutoff_len counted in the log.
    (data / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps([GOOD] * 8).encode())
    (data / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + lines([GOOD] * 8).encode())
    (data / "broken.jsonl").write_text(lines([GOOD] * 4) + "\n{not json\n" + lines([GOOD] * 4))
    config = write_config(tmp_path / "run.yaml", output_dir=str(tmp_path / "ok1"), dataset=str(data / "bom.json"),
                          cutoff_len=8)  # fmt: skip
    assert run(capsys, "train", config)[0] == 0
    assert "8 of 8 prompts (cut from the left)" in caplog.text
    config = write_config(tmp_path / "run.yaml", output_dir=str(tmp_path / "ok0"), dataset=str(data / "bom.jsonl"))
    assert run(capsys, "train", config)[0] == 0
    config = write_config(tmp_path / "run.yaml", output_dir=str(tmp_path / "ok2"), dataset=str(data / "broken.jsonl"),
                          skip_invalid_rows=True)  # fmt: skip
    assert run(capsys, "train", config)[0] == 0
    assert "Dropped 1 of 9 rows" in caplog.text and "unreadable line" in caplog.text


DPO = dict(TINY_RM, stage="dpo", eval_dataset="builtin:synthetic", synthetic_num_pairs=24, max_steps=3,
           learning_rate=5e-3, per_device_eval_batch_size=24)  # fmt: skip


@pytest.mark.slow
def test_eval_of_a_full_dpo_checkpoint_uses_the_run_s_reference(tmp_path, capsys):
    """`discoalign eval ... model_name_or_path=<trained>` reproduces the training run's own final eval: the
    reference is the model the run started from (read from the saved config), not the trained policy."""
    config = tmp_path / "dpo.yaml"
    config.write_text(yaml.safe_dump(dict(DPO, output_dir=str(tmp_path / "out"))), encoding="utf-8")
    assert run(capsys, "train", str(config))[0] == 0
    trained = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert abs(trained["eval_rewards/margins"]) > 1e-4  # training moved the policy away from its reference
    for out in ("eval1", "out"):  # a fresh folder, then the checkpoint's own folder (as docs/dpo.md shows)
        model = f"model_name_or_path={tmp_path / 'out'}"
        assert run(capsys, "eval", str(config), model, f"output_dir={tmp_path / out}")[0] == 0
        again = json.loads((tmp_path / out / "eval_results.json").read_text())
        for key in ("eval_loss", "eval_rewards/margins", "eval_rewards/accuracies"):
            assert again[key] == pytest.approx(trained[key], abs=1e-5), key


def test_no_traceback_from_the_real_command(tmp_path):
    """One subprocess run (they cost seconds of imports): a data mistake found after the model loaded exits 2
    with one error line; the in-process tests above cover the other mistakes."""
    bad_row = tmp_path / "bad.jsonl"
    bad_row.write_text(json.dumps(dict(GOOD, rejected=[{"role": "user", "content": "x"}])))
    config = write_config(tmp_path / "run.yaml", dataset=str(bad_row))
    proc = subprocess.run(
        [sys.executable, "-m", "discoalign", "train", config, f"output_dir={tmp_path / 'out'}"],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "`rejected[0].role`" in proc.stderr, proc.stderr
    assert proc.stderr.count("discoalign: error:") == 1


def test_cpu_threads_respect_omp_num_threads(monkeypatch):
    import torch

    from discoalign.cli.main import DEFAULT_CPU_THREADS, _set_cpu_threads

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        _set_cpu_threads()
        assert torch.get_num_threads() == 1  # left to torch, which read OMP_NUM_THREADS at start
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setattr(os, "cpu_count", lambda: 16)
        _set_cpu_threads()
        assert torch.get_num_threads() == DEFAULT_CPU_THREADS
        monkeypatch.setattr(os, "cpu_count", lambda: 2)
        _set_cpu_threads()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
