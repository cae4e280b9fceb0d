"""Stage `kto`: parity with TRL 1.16's `KTOTrainer` (ids, loss and metrics for a fixed batch, full model and LoRA),
the loss by hand, LlamaFactory's data layout (`messages` + `label` through `kto_tag`), data errors that name the row
and field, the config rules, and a tiny end-to-end run."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import train_logs

from discoalign.config import build_config
from discoalign.data.synthetic import synthetic_pair_rows
from discoalign.errors import ConfigError, DataError
from discoalign.losses.kto import kto_loss, kto_metrics, kto_reference_point
from discoalign.train.kto.workflow import build_kto_trainer, run_kto

BATCH = 4
BETA = 0.1
PAIRS = synthetic_pair_rows(4, seed=5)
# TRL's unpaired conversational rows; labels mixed inside the first batch.
TRL_ROWS = [
    {"prompt": p["prompt"], "completion": p[side], "label": side == "chosen"}
    for p, side in zip(PAIRS + PAIRS, ["chosen", "rejected", "rejected", "chosen"] * 2)
]
TRL_ROWS[3]["prompt"] = [{"role": "system", "content": "Be brief."}, *TRL_ROWS[3]["prompt"]]
# The same rows in LlamaFactory's layout: `messages` plus the label column that dataset_info.json maps `kto_tag` to.
LF_ROWS = [{"messages": r["prompt"] + r["completion"], "tag": r["label"]} for r in TRL_ROWS]
LF_ENTRY = {"file_name": "kto.json", "formatting": "sharegpt", "columns": {"messages": "messages", "kto_tag": "tag"},
            "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
                     "system_tag": "system"}}  # fmt: skip


@pytest.fixture(scope="module")
def lf_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("kto_data")
    (root / "kto.json").write_text(json.dumps(LF_ROWS), encoding="utf-8")
    (root / "dataset_info.json").write_text(json.dumps({"kto_demo": LF_ENTRY}), encoding="utf-8")
    return str(root)


def _ours(tmp_path, policy_dir, lf_dir, **keys):
    cfg = build_config({
        "stage": "kto", "model_name_or_path": policy_dir, "dataset": "kto_demo", "dataset_dir": lf_dir,
        "cutoff_len": 4096, "pref_beta": BETA, "output_dir": str(tmp_path / "ours"),
        "per_device_train_batch_size": BATCH, "do_train": True, "use_cpu": True, **keys,
    })  # fmt: skip
    return build_kto_trainer(cfg)[0]


def _trl(tmp_path, policy_dir, tokenizer, ref_dir=None, peft_config=None, **weights):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import KTOConfig, KTOTrainer

    args = KTOConfig(output_dir=str(tmp_path / "trl"), report_to="none", max_length=None, bf16=False, use_cpu=True,
                     beta=BETA, per_device_train_batch_size=BATCH, **weights)  # fmt: skip
    return KTOTrainer(
        model=AutoModelForCausalLM.from_pretrained(policy_dir),
        ref_model=AutoModelForCausalLM.from_pretrained(ref_dir) if ref_dir else None,
        args=args,
        train_dataset=Dataset.from_list(TRL_ROWS),
        processing_class=tokenizer,
        peft_config=peft_config,
    )


def _step(trainer, metrics):
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(BATCH)]))
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch).item()
    return loss, {k: v[-1] for k, v in metrics().items()}


def _compare(ours, theirs):
    for i in range(len(TRL_ROWS)):
        assert ours.train_dataset[i]["prompt_input_ids"] == theirs.train_dataset[i]["prompt_ids"], i
        assert ours.train_dataset[i]["response_input_ids"] == theirs.train_dataset[i]["completion_ids"], i
        assert ours.train_dataset[i]["label"] == TRL_ROWS[i]["label"]
    our_loss, our_metrics = _step(ours, lambda: ours._stored_metrics["train"])
    theirs.model.train()  # TRL files its metrics by the model's mode (dropout is off in both)
    trl_loss, trl_metrics = _step(theirs, lambda: theirs._metrics["train"])
    assert our_loss == pytest.approx(trl_loss, abs=1e-5)
    assert abs(our_loss - 0.5) > 1e-4  # not the untrained policy's constant
    for key in ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert our_metrics[key] == pytest.approx(trl_metrics[key], abs=1e-4), key
    return our_metrics


@pytest.mark.parametrize("weights", [{}, {"desirable_weight": 1.5, "undesirable_weight": 0.7}])
def test_full_model_matches_trl_kto(tmp_path, tiny_dirs, ref_dir, lf_dir, weights):
    pytest.importorskip("trl")
    policy_dir = tiny_dirs["qwen3"]
    ours = _ours(tmp_path, policy_dir, lf_dir, ref_model_name_or_path=ref_dir, **weights)  # TRL names as aliases
    theirs = _trl(tmp_path, policy_dir, ours.processing_class, ref_dir=ref_dir, **weights)
    _compare(ours, theirs)


def test_lora_matches_trl_kto_and_z0_is_positive(tmp_path, tiny_dirs, lf_dir):
    pytest.importorskip("trl")
    from peft import LoraConfig

    policy_dir = tiny_dirs["qwen3"]
    ours = _ours(tmp_path, policy_dir, lf_dir, finetuning_type="lora", lora_rank=4)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in ours.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    peft = ours.model.backbone.peft_config["default"]
    lora = LoraConfig(r=peft.r, lora_alpha=peft.lora_alpha, lora_dropout=0.0,
                      target_modules=sorted(peft.target_modules), task_type="CAUSAL_LM")  # fmt: skip
    theirs = _trl(tmp_path, policy_dir, ours.processing_class, peft_config=lora)
    own = dict(ours.model.backbone.named_parameters())
    with torch.no_grad():
        for name, p in theirs.model.named_parameters():
            if "lora_" in name:
                p.copy_(own[name])
    metrics = _compare(ours, theirs)
    assert ours.ref_model is None and ours.reference_forward_calls == 1
    assert metrics["kl"] >= 0


# ---- by hand ---------------------------------------------------------------------------------------------------


def test_kto_loss_by_hand():
    policy = torch.tensor([-5.0, -7.0, -3.0, -9.0])
    ref = torch.tensor([-5.5, -6.0, -3.2, -8.0])
    desirable = torch.tensor([True, False, True, False])
    kl_policy, kl_ref = torch.tensor([-10.0, -12.0, -11.0, -9.0]), torch.tensor([-10.5, -12.2, -10.0, -9.1])
    z0 = kto_reference_point(kl_policy, kl_ref).clamp(min=0)
    assert z0.item() == pytest.approx(max(0.0, (0.5 + 0.2 - 1.0 + 0.1) / 4), abs=1e-7)  # mean -0.05: clamped to 0
    z0 = torch.tensor(0.3)
    losses, rewards = kto_loss(policy, ref, desirable, z0, 0.5, 2.0, 0.5)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    r = [0.5, -1.0, 0.2, -1.0]
    want = [2.0 * (1 - sig(0.5 * (r[0] - 0.3))), 0.5 * (1 - sig(0.5 * (0.3 - r[1]))),
            2.0 * (1 - sig(0.5 * (r[2] - 0.3))), 0.5 * (1 - sig(0.5 * (0.3 - r[3])))]  # fmt: skip
    assert losses.tolist() == pytest.approx(want, rel=1e-6)
    metrics = kto_metrics(policy, rewards, desirable, z0)
    assert metrics["rewards/chosen"].item() == pytest.approx(0.5 * (0.5 + 0.2) / 2, rel=1e-6)
    assert metrics["rewards/margins"].item() == pytest.approx(0.5 * (0.35 + 1.0), rel=1e-6)
    only_desirable = kto_metrics(policy, rewards, torch.ones(4, dtype=torch.bool), z0)
    assert "rewards/rejected" not in only_desirable and "rewards/margins" not in only_desirable


# ---- data and config errors ---------------------------------------------------------------------------------------


def _cfg(tmp_path, **keys):
    return build_config({"stage": "kto", "model_name_or_path": "builtin:tiny-qwen3", "dataset": "builtin:synthetic",
                         "output_dir": str(tmp_path), "do_train": True, "use_cpu": True, **keys})  # fmt: skip


@pytest.mark.parametrize(
    "row, field, words",
    [
        ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}, "label", "no such"),
        ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}], "label": "yes"},
         "label", "expected true or false"),
        ({"messages": [{"role": "user", "content": "Hi"}], "label": True}, "messages", "ending with an assistant"),
        ({"prompt": "Hi", "completion": "", "label": False}, "response", "empty"),
    ],
)  # fmt: skip
def test_bad_rows_name_the_row_and_field(tmp_path, tokenizer, row, field, words):
    from discoalign.data import get_dataset

    good = {"prompt": "Hello", "completion": "Hi there.", "label": True}
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in (good, good, row)), encoding="utf-8")
    cfg = _cfg(tmp_path / "out", dataset=str(path))
    with pytest.raises(DataError, match=rf"row 2 \(0-based\), field `{field}`.*{words}"):
        get_dataset(cfg.data, tokenizer, stage="kto")


def test_trl_layout_and_pairs_unpaired(tmp_path, tokenizer):
    from discoalign.data import get_dataset

    bundle = get_dataset(_cfg(tmp_path, synthetic_num_pairs=6).data, tokenizer, stage="kto")
    assert len(bundle.train) == 12 and bundle.train["label"] == [True, False] * 6
    assert bundle.train[0]["response"] == bundle.train[0]["response"] and bundle.train[0]["prompt"] == \
        bundle.train[1]["prompt"]  # fmt: skip


def test_config_rules(tmp_path):
    with pytest.raises(ConfigError, match=r"`kto_chosen_weight` applies to `stage: kto` only"):
        build_config({"stage": "dpo", "kto_chosen_weight": 2.0, "output_dir": str(tmp_path)})
    for key, value in (("pref_loss", "ipo"), ("label_smoothing", 0.1), ("pref_ftx", 1.0)):
        with pytest.raises(ConfigError, match=rf"`{key}` is a key of the DPO loss"):
            _cfg(tmp_path, **{key: value})
    with pytest.raises(ConfigError, match=r"`kto_rejected_weight` is 0"):
        _cfg(tmp_path, kto_rejected_weight=0.0)
    with pytest.raises(ConfigError, match=r"`add_beta_head`.*stage: kto"):
        _cfg(tmp_path, add_beta_head=True)
    assert _cfg(tmp_path, undesirable_weight=0.5).finetuning.kto_rejected_weight == 0.5  # TRL's name
    with pytest.raises(ConfigError, match=r"`per_device_train_batch_size` of 2 or more, not 1"):
        _cfg(tmp_path, per_device_train_batch_size=1, gradient_accumulation_steps=8)  # LlamaFactory's example


# ---- end to end ---------------------------------------------------------------------------------------------------


def test_tiny_run_trains_logs_and_evaluates(tmp_path):
    results = run_kto(_cfg(tmp_path, synthetic_num_pairs=4, per_device_train_batch_size=8, max_steps=5,
                           learning_rate=5e-3, logging_steps=1, eval_dataset="builtin:synthetic", do_eval=True,
                           save_strategy="no", disable_tqdm=True))  # fmt: skip
    logs = train_logs(tmp_path)
    assert {"kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen"} <= set(logs[0])
    assert logs[-1]["loss"] < logs[0]["loss"] and logs[-1]["rewards/margins"] > 0
    assert math.isfinite(results["eval"]["eval_loss"]) and "eval_kl" in results["eval"]
    assert (tmp_path / "plots" / "loss.png").is_file()


def test_eval_of_a_saved_run_uses_its_starting_model_as_reference(tmp_path):
    run = {"synthetic_num_pairs": 8, "per_device_train_batch_size": 4, "per_device_eval_batch_size": 4,
           "max_steps": 3, "learning_rate": 5e-3, "eval_dataset": "builtin:synthetic", "do_eval": True,
           "save_strategy": "no", "disable_tqdm": True, "group_by_length": True}  # fmt: skip
    trained = run_kto(_cfg(tmp_path / "run", **run))["eval"]
    again = run_kto(_cfg(tmp_path / "eval", **{**run, "do_train": False, "group_by_length": False},
                         model_name_or_path=str(tmp_path / "run")))["eval"]  # fmt: skip
    assert again["eval_loss"] == pytest.approx(trained["eval_loss"], abs=1e-6)
    assert again["eval_rewards/margins"] == pytest.approx(trained["eval_rewards/margins"], abs=1e-6) != 0


def test_the_example_trains_one_step(tmp_path):
    from pathlib import Path

    from discoalign.config.loader import load_config

    example = Path(__file__).resolve().parents[1] / "examples" / "kto.yaml"
    overrides = {"output_dir": str(tmp_path), "max_steps": 1, "synthetic_num_pairs": 8, "do_train": True,
                 "do_eval": True, "per_device_eval_batch_size": 8, "plot_loss": False, "disable_tqdm": True}  # fmt: skip
    results = run_kto(load_config(str(example), overrides))
    assert results["train"]["train_loss"] > 0 and "eval_kl" in results["eval"]


# LLaMA-Factory's examples/train_lora/llama3_lora_kto.yaml (Apache-2.0), with model_name_or_path -> builtin:tiny-qwen3
# and use_cpu added; `kto_en_demo` is registered over a small file of our own in its layout.
LLAMAFACTORY_KTO = {
    "model_name_or_path": "builtin:tiny-qwen3", "use_cpu": True, "stage": "kto", "do_train": True,
    "finetuning_type": "lora", "lora_target": "all", "pref_beta": 0.1, "dataset": "kto_en_demo", "template": "llama3",
    "cutoff_len": 2048, "max_samples": 1000, "overwrite_cache": True, "preprocessing_num_workers": 16,
    "output_dir": "saves/llama3-8b/lora/kto", "logging_steps": 10, "save_steps": 500, "plot_loss": True,
    "overwrite_output_dir": True, "per_device_train_batch_size": 1, "gradient_accumulation_steps": 8,
    "learning_rate": 5.0e-6, "num_train_epochs": 3.0, "lr_scheduler_type": "cosine", "warmup_ratio": 0.1, "bf16": True,
    "ddp_timeout": 180000000, "val_size": 0.1, "per_device_eval_batch_size": 1, "eval_strategy": "steps",
    "eval_steps": 500,
}  # fmt: skip


def test_llamafactory_kto_example_one_error_then_trains(tmp_path, capsys, monkeypatch):
    import yaml

    from discoalign.cli.main import main

    (tmp_path / "data").mkdir()
    rows = [{"messages": [{"content": f"Question {i}?", "role": "user"}, {"content": f"Answer {i}.", "role": "assistant"}],
             "label": i % 3 != 0} for i in range(20)]  # fmt: skip
    (tmp_path / "data" / "kto_en_demo.json").write_text(json.dumps(rows), encoding="utf-8")
    entry = {"file_name": "kto_en_demo.json", "formatting": "sharegpt", "columns": {"messages": "messages",
             "kto_tag": "label"}, "tags": LF_ENTRY["tags"]}  # fmt: skip
    (tmp_path / "data" / "dataset_info.json").write_text(json.dumps({"kto_en_demo": entry}), encoding="utf-8")
    (tmp_path / "llama3_lora_kto.yaml").write_text(yaml.safe_dump(LLAMAFACTORY_KTO), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    assert main(["train", "llama3_lora_kto.yaml"]) == 2
    err = capsys.readouterr().err
    assert "`per_device_train_batch_size` of 2 or more, not 1" in err and err.count("discoalign: error:") == 1
    code = main(["train", "llama3_lora_kto.yaml", "per_device_train_batch_size=8", "gradient_accumulation_steps=1",
                 "max_steps=2"])  # fmt: skip
    assert code == 0
    saved = yaml.safe_load((tmp_path / "saves/llama3-8b/lora/kto/discoalign_config.yaml").read_text())
    assert saved["stage"] == "kto" and saved["finetuning_type"] == "lora"
