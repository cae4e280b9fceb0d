"""Stage `dpo`: the policy, its reference and the data (the skeleton that trains, evaluates and saves: `train.workflow`)."""

from __future__ import annotations

import logging
from typing import Any

from transformers import TrainerCallback

from ...config.loader import CONFIG_FILE_NAME, RunConfig
from ...config.plan import HeadPlan
from ...data import get_dataset
from ...data.media_collator import make_pairwise_collator
from ...errors import ConfigError
from ...models.loader import load_model_with_heads
from ..distributed import is_zero3_partitioned
from ..frozen import frozen_copy
from ..workflow import StageWorkflow
from .trainer import DPOTrainer

logger = logging.getLogger(__name__)

PLOTS = (
    ("loss.png", "loss", ["loss", "eval_loss"]),
    ("rewards_accuracy.png", "reward accuracy", ["rewards/accuracies", "eval_rewards/accuracies"]),
    ("rewards_margins.png", "reward margins", ["rewards/margins", "eval_rewards/margins"]),
    ("beta.png", "beta distribution (mean, min, max per logged step)", ["beta/mean", "beta/min", "beta/max"]),
    ("variance.png", "variance", ["variance/chosen", "variance/rejected"]),
)


def load_reference(cfg: RunConfig, policy) -> Any | None:
    """The frozen reference `ModelWithHeads`, or None when the trainer needs no separate one.

    SimPO / ORPO: None, and none is ever run. LoRA: None (the policy with adapters disabled is the reference). Full
    fine-tuning: the model in `ref_model_name_or_path`, else a frozen copy of the policy, unless
    `precompute_ref_logps` lets the untrained policy itself serve once before training.
    """
    ft = cfg.finetuning
    if cfg.plan.reference_free:  # SimPO, ORPO (config.reference_free refuses the keys that would name one)
        return None
    if ft.finetuning_type == "lora":
        if cfg.model.ref_model_name_or_path:
            logger.warning(
                "`ref_model_name_or_path` is ignored with `finetuning_type: lora`: the reference is the base "
                "model with the adapters disabled."
            )
        return None
    if cfg.model.ref_model_name_or_path:
        ref_args = cfg.model.for_model(cfg.model.ref_model_name_or_path)
        # The reference needs a backbone only: no heads, no adapter, frozen.
        ref, _ = load_model_with_heads(ref_args, ft, heads=HeadPlan.of(), is_trainable=False)
        return ref
    if ft.precompute_ref_logps:
        return None

    if is_zero3_partitioned(policy):
        # ZeRO-3 sharded the policy while it loaded: a copy would copy shards. Load the same weights again (they
        # are sharded too, and the reference's DeepSpeed engine gathers each layer as it runs).
        ref, _ = load_model_with_heads(cfg.model, ft, heads=HeadPlan.of(), is_trainable=False)
        return ref.requires_grad_(False).eval()
    return frozen_copy(policy)


def resolve_eval_reference(cfg: RunConfig) -> None:
    """Evaluation of a full-fine-tuned DPO (or KTO) checkpoint: take its reference from the config saved with the run.

    A frozen copy of the policy as reference makes every log-ratio 0 (accuracy 0, margins 0, loss log 2), so for
    `do_train: false` without `ref_model_name_or_path` the reference is the saved run's `ref_model_name_or_path`,
    else the model that run started from. Sets `cfg.model.ref_model_name_or_path` (and the resolved config, so
    an eval written into the same folder keeps pointing at the right reference). Runs before any model loads.
    """
    import os

    import yaml

    ft, args = cfg.finetuning, cfg.training
    if ft.finetuning_type != "full" or args.do_train or cfg.model.ref_model_name_or_path or cfg.plan.reference_free:
        return
    name = os.path.expanduser(cfg.model.model_name_or_path)
    saved_path = os.path.join(name, CONFIG_FILE_NAME)
    if not os.path.isfile(saved_path):
        if os.path.isdir(name):
            logger.warning(
                "Evaluating %s with itself as the DPO reference (no %s with the run's starting model there): every "
                "log-ratio is 0. Set `ref_model_name_or_path` to the model it was trained from.", name, CONFIG_FILE_NAME
            )  # fmt: skip
        return
    try:
        with open(saved_path, encoding="utf-8") as f:
            saved = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"Cannot read {saved_path!r} to find the DPO reference ({e}); set `ref_model_name_or_path`."
                          ) from None  # fmt: skip
    if saved.get("stage") not in ("dpo", "kto") or saved.get("finetuning_type") not in (None, "full"):
        return
    reference = saved.get("ref_model_name_or_path") or saved.get("model_name_or_path")
    if not reference or os.path.abspath(os.path.expanduser(reference)) == os.path.abspath(name):
        raise ConfigError(f"{saved_path!r} does not name the model the DPO run started from; set "
                          "`ref_model_name_or_path` to it.")  # fmt: skip
    logger.info("DPO reference for evaluating %s: %s (from %s).", name, reference, saved_path)
    cfg.model.ref_model_name_or_path = reference
    cfg.resolved["ref_model_name_or_path"] = reference


class DPOWorkflow(StageWorkflow):
    """Stage `dpo`: the policy (and reference), the data, the `DPOTrainer`; plots of loss, reward accuracy, margins,
    beta and variance."""

    plots = PLOTS

    def build(self, cfg: RunConfig, callbacks: list[TrainerCallback] | None):
        args = cfg.training
        resolve_eval_reference(cfg)
        model, tokenizer = load_model_with_heads(cfg.model, cfg.finetuning, heads=cfg.plan.heads, is_trainable=True)
        model.train()
        bundle = get_dataset(cfg.data, tokenizer, stage="dpo", seed=args.seed, media=model.media_processor)
        trainer = DPOTrainer(
            model,
            cfg,
            ref_model=load_reference(cfg, model),
            train_dataset=bundle.train if args.do_train else None,
            eval_dataset=bundle.eval,
            data_collator=make_pairwise_collator(tokenizer, model, pack_pairs=cfg.data.pack_pairs),
            processing_class=tokenizer,
            callbacks=callbacks,
        )
        return trainer, bundle


def build_dpo_trainer(cfg: RunConfig, callbacks: list[TrainerCallback] | None = None):
    """Seed and build the `DPOTrainer` (benchmarks and tests drive it themselves). Returns (trainer, bundle)."""
    return DPOWorkflow().build_trainer(cfg, callbacks)


def run_dpo(cfg: RunConfig, callbacks: list[TrainerCallback] | None = None) -> dict[str, Any]:
    """Train and/or evaluate a DPO-family policy as `cfg` says; returns data stats and train / eval metrics."""
    return DPOWorkflow().run(cfg, callbacks)
