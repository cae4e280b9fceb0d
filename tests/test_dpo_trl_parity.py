"""Parity with TRL 1.16 `DPOTrainer` on conversational data with the tokenizer's chat template.

Same rows, same weights: our prompt/chosen/rejected token ids equal TRL's processing, and the loss at step 0
equals TRL's to 1e-5 for sigmoid (label_smoothing 0 and 0.1), robust (0.2), ipo and hinge, with a full model and with LoRA.
The policy must differ from the reference or every loss is a constant (d = 0): the full model gets a reference
built with another seed, and the LoRA adapter gets non-zero B matrices (copied into TRL's adapter).

TRL 1.16's `sigmoid` ignores `label_smoothing`; our conservative-DPO loss
`-(1 - ls) log s(bd) - ls log s(-bd)` is exactly TRL's weighted sum `2 (1 - ls) * sigmoid - (1 - 2 ls) * robust`
(`robust` = `(-(1 - ls) log s(bd) + ls log s(-bd)) / (1 - 2 ls)`), so that is what we compare against.
"""

from __future__ import annotations

import json

import pytest
import torch

from discoalign.config import build_config
from discoalign.data.synthetic import synthetic_pair_rows
from discoalign.train.dpo.workflow import build_dpo_trainer

trl = pytest.importorskip("trl")
from trl import DPOConfig  # noqa: E402
from trl import DPOTrainer as TRLDPOTrainer  # noqa: E402

BATCH = 4
BETA = 0.1

ROWS = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in synthetic_pair_rows(5, seed=7)] + [
    {
        "prompt": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Why is the sky blue?"},
        ],
        "chosen": [{"role": "assistant", "content": "Blue light scatters the most."}],
        "rejected": [{"role": "assistant", "content": "No idea."}],
    }
]

# (our pref_loss, label_smoothing) -> (TRL loss_type, loss_weights)
CASES = {
    ("sigmoid", 0.0): (["sigmoid"], None),
    ("sigmoid", 0.1): (["sigmoid", "robust"], [2 * (1 - 0.1), -(1 - 2 * 0.1)]),
    ("robust", 0.2): (["robust"], None),  # robust DPO (Chowdhury et al. 2024), label_smoothing = flip rate
    ("ipo", 0.0): (["ipo"], None),
    ("hinge", 0.0): (["hinge"], None),
}


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("dpo_parity") / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS), encoding="utf-8")
    return str(path)


def _ours(tmp_path, policy_dir, data_file, finetuning_type, pref_loss, ls, ref_dir=None):
    cfg = build_config(
        {
            "stage": "dpo",
            "model_name_or_path": policy_dir,
            "ref_model_name_or_path": ref_dir,
            "finetuning_type": finetuning_type,
            "lora_rank": 4,
            "dataset": data_file,
            "cutoff_len": 4096,
            "pref_beta": BETA,
            "pref_loss": pref_loss,
            "label_smoothing": ls,
            "output_dir": str(tmp_path / "ours"),
            "per_device_train_batch_size": BATCH,
            "do_train": True,
            "use_cpu": True,
        }
    )
    trainer, _ = build_dpo_trainer(cfg)
    return trainer


def _perturb_lora(model) -> None:
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _trl(tmp_path, policy_dir, tokenizer, ref_dir=None, peft_config=None):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    args = DPOConfig(
        output_dir=str(tmp_path / "trl"),
        report_to="none",
        max_length=None,
        bf16=False,
        use_cpu=True,
        beta=BETA,
        per_device_train_batch_size=BATCH,
    )
    ref = AutoModelForCausalLM.from_pretrained(ref_dir) if ref_dir else None
    return TRLDPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(policy_dir),
        ref_model=ref,
        args=args,
        train_dataset=Dataset.from_list(ROWS),
        processing_class=tokenizer,
        peft_config=peft_config,
    )


def _trl_loss(trainer, loss_type, loss_weights, ls) -> float:
    # Loss settings are read at every compute_loss, so one TRL trainer serves every case.
    trainer.loss_types, trainer.loss_weights = loss_type, loss_weights or [1.0] * len(loss_type)
    trainer.label_smoothing = ls
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(BATCH)])
    with torch.no_grad():
        return trainer.compute_loss(trainer.model, batch).item()


def _our_loss(trainer) -> float:
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(BATCH)])
    with torch.no_grad():
        return trainer.compute_loss(trainer.model, batch).item()


def _assert_same_ids(ours, theirs):
    for our_col, trl_col in (("prompt_input_ids", "prompt_ids"), ("chosen_input_ids", "chosen_ids"),
                             ("rejected_input_ids", "rejected_ids")):  # fmt: skip
        assert ours.train_dataset[our_col] == theirs.train_dataset[trl_col], our_col


def test_full_model_ids_and_step0_losses_match_trl(tmp_path, tiny_dirs, data_file, ref_dir):
    policy_dir = tiny_dirs["qwen3"]
    first = _ours(tmp_path, policy_dir, data_file, "full", "sigmoid", 0.0, ref_dir)
    theirs = _trl(tmp_path, policy_dir, first.processing_class, ref_dir=ref_dir)
    _assert_same_ids(first, theirs)
    for (pref_loss, ls), (loss_type, weights) in CASES.items():
        ours = first if (pref_loss, ls) == ("sigmoid", 0.0) else _ours(tmp_path, policy_dir, data_file, "full",
                                                                        pref_loss, ls, ref_dir)  # fmt: skip
        our_loss, trl_loss = _our_loss(ours), _trl_loss(theirs, loss_type, weights, ls)
        assert abs(our_loss - trl_loss) < 1e-5, (pref_loss, ls, our_loss, trl_loss)
        assert (
            abs(our_loss - {"sigmoid": 0.6931, "robust": 0.6931, "ipo": 25.0, "hinge": 1.0}[pref_loss]) > 1e-3
        )  # not d = 0


def test_lora_ids_and_step0_losses_match_trl(tmp_path, tiny_dirs, data_file):
    from peft import LoraConfig

    policy_dir = tiny_dirs["qwen3"]
    trainers = {case: _ours(tmp_path, policy_dir, data_file, "lora", *case) for case in CASES}
    for trainer in trainers.values():
        _perturb_lora(trainer.model)
    first = trainers[("sigmoid", 0.0)]
    our_peft = first.model.backbone.peft_config["default"]
    lora = LoraConfig(
        r=our_peft.r,
        lora_alpha=our_peft.lora_alpha,
        lora_dropout=0.0,
        target_modules=sorted(our_peft.target_modules),
        task_type="CAUSAL_LM",
    )
    theirs = _trl(tmp_path, policy_dir, first.processing_class, peft_config=lora)
    ours_lora = dict(first.model.backbone.named_parameters())
    copied = 0
    with torch.no_grad():
        for name, p in theirs.model.named_parameters():
            if "lora_" in name:
                p.copy_(ours_lora[name])
                copied += 1
    assert copied == sum("lora_" in n for n in ours_lora) > 0
    _assert_same_ids(first, theirs)
    for (pref_loss, ls), (loss_type, weights) in CASES.items():
        our_loss, trl_loss = _our_loss(trainers[(pref_loss, ls)]), _trl_loss(theirs, loss_type, weights, ls)
        assert abs(our_loss - trl_loss) < 1e-5, (pref_loss, ls, our_loss, trl_loss)
        assert abs(our_loss - {"sigmoid": 0.6931, "robust": 0.6931, "ipo": 25.0, "hinge": 1.0}[pref_loss]) > 1e-3
