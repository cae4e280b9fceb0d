"""The one workflow every stage runs: seed, build, train, evaluate, plot, save the resolved config.

A stage says only what differs (`StageWorkflow`): how its trainer and data are built, its plots, and (RM, PPO) what
its evaluation or training adds to the results. LlamaFactory's `train/<stage>/workflow.py` pattern, with the
skeleton written once.
"""

from __future__ import annotations

from typing import Any, ClassVar

from transformers import TrainerCallback

from ..config.loader import RunConfig
from .base_trainer import DiscoTrainer

Plots = tuple[tuple[str, str, list[str]], ...]


class StageWorkflow:
    """One stage's parts of the workflow. `plots`: (file, title, logged keys) written under `output_dir/plots/`."""

    plots: ClassVar[Plots] = ()

    def build(self, cfg: RunConfig, callbacks: list[TrainerCallback] | None) -> tuple[DiscoTrainer, Any]:
        """Load the model(s) and the data and build the trainer. Returns (trainer, data bundle)."""
        raise NotImplementedError

    def evaluate(self, trainer: DiscoTrainer, cfg: RunConfig, bundle: Any) -> dict[str, float]:
        """Evaluate on `eval_dataset`; print and save `eval_results.json`. The metrics must reach the trainer's log
        history (`trainer.log`), where `trainer_state.json` and the plots read them."""
        return trainer.evaluate_and_save()

    def after_training(self, trainer: DiscoTrainer, results: dict[str, Any]) -> None:
        """Add what a stage reads off its training to `results` (nothing by default)."""

    def build_trainer(self, cfg: RunConfig, callbacks: list[TrainerCallback] | None = None) -> tuple[DiscoTrainer, Any]:
        """Seed, then `build`: the run's one seed, before any model is built (LoRA's init and the value head's draw
        from it, and two runs that differ only in an unused head draw the same numbers)."""
        from transformers import set_seed

        set_seed(cfg.training.seed)
        return self.build(cfg, callbacks)

    def run(self, cfg: RunConfig, callbacks: list[TrainerCallback] | None = None) -> dict[str, Any]:
        """Train and/or evaluate as `cfg` says; returns the data statistics and the train / eval metrics.

        Writes the checkpoint, `train_results.json` / `eval_results.json`, the plots and the resolved config.
        """
        args = cfg.training
        trainer, bundle = self.build_trainer(cfg, callbacks)
        results: dict[str, Any] = {"data_stats": dict(bundle.stats)}
        if args.do_train:
            results["train"] = trainer.train_and_save()
            self.after_training(trainer, results)
        if args.do_eval and trainer.eval_dataset is not None:
            results["eval"] = self.evaluate(trainer, cfg, bundle)
            if args.do_train and trainer.is_world_process_zero():
                trainer.save_state()  # again: trainer_state.json then ends with the final evaluation, as the plots
        trainer.plot_history(list(self.plots))
        if trainer.is_world_process_zero():
            cfg.save(args.output_dir)
        return results
