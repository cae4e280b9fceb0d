"""Stage `sft`: load, train on prompt + response data, evaluate (loss, perplexity); the skeleton is `train.workflow`."""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from ...config.attention import check_attention_implementation
from ...config.loader import RunConfig
from ...data import get_dataset
from ...data.sft import SFTCollator
from ...errors import ConfigError
from ...models.loader import load_model_with_heads
from ..workflow import StageWorkflow
from .trainer import SFTTrainer

PLOTS = (("loss.png", "loss", ["loss", "eval_loss"]),)


def check_packing(model) -> None:
    """`packing: true` needs an attention that takes a block-diagonal mask, on a text model."""

    modality = getattr(model.modality, "value", model.modality)
    if modality != "language_only":
        raise ConfigError(f"`packing: true` supports text-only models; this model's modality is {modality!r}. "
                          "Set `packing: false`.")  # fmt: skip
    try:
        check_attention_implementation(getattr(model.config, "_attn_implementation", None))
    except ConfigError:
        raise ConfigError(
            "`packing: true` lays sequences end to end with a block-diagonal mask, which needs `attn_implementation` "
            f"eager or sdpa; this model uses {model.config._attn_implementation!r}. Set `packing: false`."
        ) from None


class SFTWorkflow(StageWorkflow):
    """Stage `sft`: the output directory is a checkpoint like every stage's (full weights or a LoRA adapter, tokenizer,
    config), loadable as `model_name_or_path` of a later `rm`, `dpo` or `ppo` run."""

    plots = PLOTS

    def build(self, cfg: RunConfig, callbacks: list[TrainerCallback] | None):
        model, tokenizer = load_model_with_heads(cfg.model, cfg.finetuning, heads=cfg.plan.heads)
        if cfg.data.packing:
            check_packing(model)
        bundle = get_dataset(cfg.data, tokenizer, stage="sft", seed=cfg.training.seed)
        trainer = SFTTrainer(
            model,
            cfg,
            train_dataset=bundle.train if cfg.training.do_train else None,
            eval_dataset=bundle.eval,
            data_collator=SFTCollator(tokenizer.pad_token_id, packing=cfg.data.packing),
            processing_class=tokenizer,
            callbacks=callbacks,
        )
        return trainer, bundle


def run_sft(cfg: RunConfig, callbacks: list[TrainerCallback] | None = None) -> dict[str, Any]:
    """Train and/or evaluate a causal LM on prompt + response rows as `cfg` says; returns the metrics."""
    return SFTWorkflow().run(cfg, callbacks)
