"""Stage `sft` end to end: load, train on prompt + response data, evaluate (loss, perplexity), save."""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from ...config.attention import check_attention_implementation
from ...config.loader import RunConfig
from ...data import get_dataset
from ...data.sft import SFTCollator
from ...errors import ConfigError
from ...models.loader import load_model_with_heads
from .trainer import SFTTrainer

PLOTS = [("loss.png", "loss", ["loss", "eval_loss"])]


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


def run_sft(cfg: RunConfig, callbacks: list[TrainerCallback] | None = None) -> dict[str, Any]:
    """Train and/or evaluate a causal LM on prompt + response rows as `cfg` says; returns the metrics.

    The output directory is a checkpoint like every stage's (full weights or a LoRA adapter, tokenizer, config),
    loadable as `model_name_or_path` of a later `rm`, `dpo` or `ppo` run.
    """
    args = cfg.training
    model, tokenizer = load_model_with_heads(cfg.model, cfg.finetuning, add_value_head=False)
    if cfg.data.packing:
        check_packing(model)
    bundle = get_dataset(cfg.data, tokenizer, stage="sft", seed=args.seed)
    trainer = SFTTrainer(
        model,
        cfg,
        train_dataset=bundle.train if args.do_train else None,
        eval_dataset=bundle.eval,
        data_collator=SFTCollator(tokenizer.pad_token_id, packing=cfg.data.packing),
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    results: dict[str, Any] = {"data_stats": dict(bundle.stats)}
    if args.do_train:
        results["train"] = trainer.train_and_save()
        trainer.plot_history(PLOTS)
    if args.do_eval and bundle.eval is not None:
        results["eval"] = trainer.evaluate_and_save()
    if trainer.is_world_process_zero():
        cfg.save(args.output_dir)
    return results
