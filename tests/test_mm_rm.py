"""Stage `rm` on each tiny multimodal model: the loss goes down, and the saved model reloads and scores identically."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import train_losses
from transformers import TrainerCallback

from discoalign.config import build_config
from discoalign.config.schema import DataArguments, FinetuningArguments, ModelArguments
from discoalign.data import get_dataset
from discoalign.data.media_collator import make_pairwise_collator
from discoalign.errors import ConfigError
from discoalign.models.loader import load_model_with_heads
from discoalign.train.tuner import run_exp

DATA = {
    "qwen2-vl": "builtin:synthetic-vl",
    "qwen2.5-vl": "builtin:synthetic-vl",
    "qwen2-audio": "builtin:synthetic-audio",
}


def fixed_batch(model, tokenizer, arch: str):
    data = get_dataset(
        DataArguments(dataset=DATA[arch], synthetic_num_pairs=4, synthetic_seed=99), tokenizer, "rm",
        media=model.media_processor,
    )  # fmt: skip
    return make_pairwise_collator(tokenizer, model)([data.train[i] for i in range(4)])


def score(model, batch, with_variance: bool):
    media = {k: batch[k] for k in model.supported_parameters if k in batch}
    model.eval()
    with torch.no_grad():
        return model.score(batch["input_ids"], batch["attention_mask"], with_variance=with_variance, **media)


class ScoreAtEnd(TrainerCallback):
    """Scores a fixed batch with the trained model in memory, to compare with the reloaded checkpoint."""

    def __init__(self, arch: str, disco: bool) -> None:
        self.arch, self.disco, self.scores = arch, disco, None

    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        self.scores = score(model, fixed_batch(model, processing_class, self.arch), self.disco)


@pytest.mark.parametrize(
    ("arch", "settings"),
    [
        ("qwen2-vl", {}),
        ("qwen2.5-vl", {"add_disco_head": True, "disco_pref": True}),
        ("qwen2-audio", {"add_disco_head": True, "disco_pref": True}),
        ("qwen2-vl", {"finetuning_type": "lora", "lora_rank": 8, "add_disco_head": True, "disco_pref": True}),
    ],
    ids=["qwen2-vl-bt", "qwen2.5-vl-disco", "qwen2-audio-disco", "qwen2-vl-lora-disco"],
)
def test_reward_model_trains_saves_reloads_and_scores_identically(tmp_path, arch, settings):
    output_dir = str(tmp_path / "rm")
    cfg = build_config({
        "stage": "rm", "model_name_or_path": f"builtin:tiny-{arch}", "dataset": DATA[arch], "synthetic_num_pairs": 8,
        "per_device_train_batch_size": 8, "max_steps": 10, "learning_rate": 3e-3, "logging_steps": 1,
        "save_strategy": "no", "do_train": True, "seed": 0, "plot_loss": False, "disable_tqdm": True, "use_cpu": True,
        "output_dir": output_dir, **settings,
    })  # fmt: skip
    disco = bool(settings.get("disco_pref"))
    callback = ScoreAtEnd(arch, disco)
    run_exp(cfg, callbacks=[callback])

    losses = train_losses(output_dir)
    assert len(losses) == 10 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, losses
    assert os.path.isfile(os.path.join(output_dir, "preprocessor_config.json"))

    reloaded, tokenizer = load_model_with_heads(
        ModelArguments(model_name_or_path=output_dir), FinetuningArguments(add_disco_head=disco),
        add_value_head=True, is_trainable=False,
    )  # fmt: skip
    assert reloaded.is_peft == (settings.get("finetuning_type") == "lora")
    mean, var = score(reloaded, fixed_batch(reloaded, tokenizer, arch), disco)
    assert torch.equal(mean, callback.scores[0])
    if disco:
        assert torch.equal(var, callback.scores[1])
        assert not torch.allclose(var, torch.ones_like(var))  # the variance head learned and was restored


def test_new_config_keys_are_checked_before_loading():
    with pytest.raises(ConfigError, match="image_min_pixels.*image_max_pixels"):
        build_config({"image_min_pixels": 4096, "image_max_pixels": 1024})
    with pytest.raises(ConfigError, match="freeze_vision_tower"):
        build_config({"freeze_vison_tower": False})


@pytest.mark.parametrize("name", ["rm_vl_disco.yaml", "rm_audio.yaml", "dpo_vl.yaml"])
def test_multimodal_examples_train_one_step(tmp_path, name):
    from discoalign.config.loader import load_config

    path = os.path.join(os.path.dirname(__file__), "..", "examples", name)
    overrides = {"output_dir": str(tmp_path), "max_steps": 1, "synthetic_num_pairs": 4, "per_device_train_batch_size": 2,
                 "per_device_eval_batch_size": 4, "do_train": True, "do_eval": True, "plot_loss": False,
                 "disable_tqdm": True, "use_cpu": True, "num_score_samples": 0}  # fmt: skip
    results = run_exp(load_config(path, overrides))
    assert results["train"]["train_loss"] > 0 and "eval_loss" in results["eval"]
