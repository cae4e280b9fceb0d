"""Stage `rm`: load, train, evaluate, write predictions, plots and a table of samples (skeleton: `train.workflow`)."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import numpy as np
from transformers import TrainerCallback

from ...config.loader import RunConfig
from ...data import get_dataset
from ...data.media_collator import make_pairwise_collator
from ...eval.calibration import reliability_bins
from ...eval.plots import plot_reliability
from ...eval.report import print_table
from ...models.loader import load_model_with_heads
from ..workflow import StageWorkflow
from .metric import make_compute_metrics, preference_log_prob
from .trainer import RewardTrainer

logger = logging.getLogger(__name__)


PLOTS = (
    ("loss.png", "loss", ["loss", "eval_loss"]),
    ("accuracy.png", "preference accuracy", ["accuracy", "eval_accuracy", "eval_true_accuracy"]),
)


class RMWorkflow(StageWorkflow):
    """Stage `rm`; its evaluation also writes `predictions.jsonl`, the reliability plot and a table of samples."""

    plots = PLOTS

    def build(self, cfg: RunConfig, callbacks: list[TrainerCallback] | None):
        model, tokenizer = load_model_with_heads(cfg.model, cfg.finetuning, heads=cfg.plan.heads)
        model.heads_config["value_head_kind"] = "reward"  # `score` and PPO's `reward_model:` accept only these
        bundle = get_dataset(cfg.data, tokenizer, stage="rm", seed=cfg.training.seed, media=model.media_processor)
        trainer = RewardTrainer(
            model,
            cfg,
            train_dataset=bundle.train if cfg.training.do_train else None,
            eval_dataset=bundle.eval,
            data_collator=make_pairwise_collator(tokenizer, model, pack_pairs=cfg.data.pack_pairs),
            processing_class=tokenizer,
            compute_metrics=make_compute_metrics(cfg.plan.uses_variance),
            callbacks=callbacks,
        )
        return trainer, bundle

    def evaluate(self, trainer: RewardTrainer, cfg: RunConfig, bundle) -> dict[str, float]:
        output = trainer.predict(bundle.eval, metric_key_prefix="eval")
        metrics = output.metrics
        trainer.log(dict(metrics))  # into the log history: trainer_state.json and the plots show the final eval
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        if trainer.is_world_process_zero():
            args = cfg.training
            rows = write_predictions(output.predictions, bundle.eval, cfg.plan.uses_variance,
                                     os.path.join(args.output_dir, "predictions.jsonl"))  # fmt: skip
            if cfg.finetuning.plot_loss:
                conf, acc, count = reliability_bins(np.array([r["probability"] for r in rows]))
                plot_reliability(conf, acc, count, os.path.join(args.output_dir, "plots", "reliability.png"),
                                 "reliability (eval)")  # fmt: skip
            show_samples(rows, bundle.eval, trainer.processing_class, cfg.finetuning.num_score_samples)
        return metrics


def run_rm(cfg: RunConfig, callbacks: list[TrainerCallback] | None = None) -> dict[str, Any]:
    """Train and/or evaluate a reward model as `cfg` says; returns the train and eval metrics."""
    return RMWorkflow().run(cfg, callbacks)


def write_predictions(predictions: np.ndarray, dataset, disco: bool, path: str) -> list[dict[str, Any]]:
    """One JSON line per eval pair: means, variances (Disco), P(chosen > rejected), the pair's `source` file and
    `source_row` (0-based) and its `prompt` messages, and the ground truth when known."""
    mean_c, mean_r, var_c, var_r = (predictions[:, i].astype(np.float64) for i in range(4))
    has_var = not np.isnan(var_c).any()
    prob = np.exp(preference_log_prob(mean_c, mean_r, var_c, var_r, disco and has_var))
    rows = []
    for i in range(len(mean_c)):
        row: dict[str, Any] = {"index": i, "mean_chosen": mean_c[i], "mean_rejected": mean_r[i]}
        if has_var:
            row["variance_chosen"] = var_c[i]
            row["variance_rejected"] = var_r[i]
        row["probability"] = prob[i]
        for key in ("source", "source_row", "prompt", "true_reward_chosen", "true_reward_rejected", "noise", "topic"):
            if key in dataset.column_names:
                row[key] = dataset[i][key]
        rows.append({k: (float(v) if isinstance(v, (np.floating, float)) else v) for k, v in row.items()})
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return rows


def show_samples(rows: list[dict[str, Any]], dataset, tokenizer, num: int) -> None:
    """Print a `rich` table of the first `num` scored eval pairs."""
    table_rows = []

    def clip(text: str, n: int) -> str:
        text = " ".join(text.split())
        return text if len(text) <= n else text[: n - 1] + "…"

    def content(messages, ids) -> str:
        # The canonical messages when the dataset kept them; the decoded tokens otherwise.
        if messages:
            return str(messages[-1]["content"])
        return tokenizer.decode(ids, skip_special_tokens=True)

    for row in rows[:num]:
        example = dataset[row["index"]]
        entry = {
            "prompt": clip(content(example.get("prompt"), example["prompt_input_ids"]), 50),
            "chosen": clip(content(example.get("chosen"), example["chosen_input_ids"]), 60),
            "rejected": clip(content(example.get("rejected"), example["rejected_input_ids"]), 60),
            "mu_c": f"{row['mean_chosen']:.3f}",
            "mu_r": f"{row['mean_rejected']:.3f}",
        }
        if "variance_chosen" in row:
            entry["var_c"] = f"{row['variance_chosen']:.3f}"
            entry["var_r"] = f"{row['variance_rejected']:.3f}"
        entry["P(c>r)"] = f"{row['probability']:.3f}"
        table_rows.append(entry)
    print_table("Scored eval samples", table_rows)
