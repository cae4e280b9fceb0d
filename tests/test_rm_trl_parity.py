"""Our BT loss equals TRL 1.16 RewardTrainer's on identical token ids and identical weights."""

from __future__ import annotations

import pytest
import torch

from discoalign.config import build_config
from discoalign.config.schema import FinetuningArguments, ModelArguments
from discoalign.data.collator import PairwiseCollator
from discoalign.models.loader import load_model_with_heads
from discoalign.train.rm.trainer import RewardTrainer


def _batch(tokenizer, with_margin: bool):
    rows = []
    g = torch.Generator().manual_seed(3)
    for i in range(4):
        prompt = torch.randint(10, 500, (5 + i,), generator=g).tolist()
        chosen = torch.randint(10, 500, (3 + 2 * i,), generator=g).tolist() + [tokenizer.eos_token_id]
        rejected = torch.randint(10, 500, (9 - i,), generator=g).tolist() + [tokenizer.eos_token_id]
        rows.append(
            {
                "prompt_input_ids": prompt,
                "chosen_input_ids": chosen,
                "rejected_input_ids": rejected,
                "margin": 0.25 * i if with_margin else 0.0,
            }
        )
    return PairwiseCollator(tokenizer.pad_token_id)(rows)


@pytest.mark.parametrize("with_margin,center", [(False, None), (True, 0.01)])
def test_bt_loss_matches_trl_reward_trainer(tmp_path, tiny_dirs, with_margin, center):
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig
    from trl import RewardTrainer as TRLRewardTrainer

    model_dir = tiny_dirs["qwen3"]
    ours, tokenizer = load_model_with_heads(
        ModelArguments(model_name_or_path=model_dir), FinetuningArguments(stage="rm"), add_value_head=True
    )
    with torch.no_grad():
        ours.value_head.summary.bias.zero_()  # a seq-cls score layer has no bias
    theirs = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    theirs.config.pad_token_id = tokenizer.pad_token_id
    with torch.no_grad():
        theirs.score.weight.copy_(ours.value_head.summary.weight)
    ours.eval()
    theirs.eval()

    batch = _batch(tokenizer, with_margin)
    cfg = build_config(
        {
            "stage": "rm",
            "model_name_or_path": model_dir,
            "output_dir": str(tmp_path / "ours"),
            "center_rewards_coefficient": center,
        }
    )
    our_loss = RewardTrainer(ours, cfg, processing_class=tokenizer).compute_loss(ours, dict(batch))

    trl_args = RewardConfig(
        output_dir=str(tmp_path / "trl"), report_to="none", center_rewards_coefficient=center, bf16=False
    )
    from datasets import Dataset

    dummy = Dataset.from_dict({"chosen": ["a"], "rejected": ["b"]})
    trl_trainer = TRLRewardTrainer(model=theirs, args=trl_args, processing_class=tokenizer, train_dataset=dummy)
    trl_inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if with_margin:
        trl_inputs["margin"] = batch["margin"]
    trl_loss = trl_trainer.compute_loss(theirs, trl_inputs)
    assert abs(our_loss.item() - trl_loss.item()) < 1e-5, (our_loss.item(), trl_loss.item())
