"""Stage `kto`: the policy and its reference, the unpaired data, the `KTOTrainer` (docs/kto.md)."""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from ...config.loader import RunConfig
from ...data import get_dataset
from ...data.kto import KTOCollator
from ...models.loader import load_model_with_heads
from ..dpo.workflow import load_reference, resolve_eval_reference
from ..workflow import StageWorkflow
from .trainer import KTOTrainer

PLOTS = (
    ("loss.png", "loss", ["loss", "eval_loss"]),
    ("kl.png", "reference point z0 (KL estimate)", ["kl", "eval_kl"]),
    ("rewards.png", "implicit rewards", ["rewards/chosen", "rewards/rejected", "rewards/margins"]),
)


class KTOWorkflow(StageWorkflow):
    """Stage `kto`: plots of loss, the reference point and the implicit rewards."""

    plots = PLOTS

    def build(self, cfg: RunConfig, callbacks: list[TrainerCallback] | None):
        args = cfg.training
        resolve_eval_reference(cfg)  # `discoalign eval` of a full KTO checkpoint: the reference its run started from
        model, tokenizer = load_model_with_heads(cfg.model, cfg.finetuning, heads=cfg.plan.heads, is_trainable=True)
        model.train()
        bundle = get_dataset(cfg.data, tokenizer, stage="kto", seed=args.seed)
        trainer = KTOTrainer(
            model,
            cfg,
            ref_model=load_reference(cfg, model),  # as DPO's: a frozen copy, `ref_model_name_or_path`, or none (LoRA)
            train_dataset=bundle.train if args.do_train else None,
            eval_dataset=bundle.eval,
            data_collator=KTOCollator(tokenizer.pad_token_id, cfg.data.cutoff_len),
            processing_class=tokenizer,
            callbacks=callbacks,
        )
        return trainer, bundle


def build_kto_trainer(cfg: RunConfig, callbacks: list[TrainerCallback] | None = None):
    """Seed and build the `KTOTrainer` (tests drive it themselves). Returns (trainer, bundle)."""
    return KTOWorkflow().build_trainer(cfg, callbacks)


def run_kto(cfg: RunConfig, callbacks: list[TrainerCallback] | None = None) -> dict[str, Any]:
    """Train and/or evaluate a KTO policy as `cfg` says; returns data stats and train / eval metrics."""
    return KTOWorkflow().run(cfg, callbacks)
