"""`DiscoTrainer`: a `transformers.Trainer` that knows our heads and checkpoint layout.

Every stage's trainer subclasses it, so arguments, logging, checkpoint rotation, DDP/DeepSpeed/FSDP and
resuming all stay the Trainer's own. What it adds:

* saving writes our layout (backbone or adapter + `heads.safetensors` + `heads_config.json` + config);
* resuming restores backbone/adapter weights *and* heads from such a checkpoint;
* heads get optimizer groups of their own at `learning_rate * <head>_lr_ratio` (`RunPlan.head_lr_ratios`);
* TRL-style stored metrics: a step stores values, `log()` averages them since the last log (NaNs left out).
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from typing import Any, Literal

import torch
from transformers import Trainer, TrainerCallback

from ..config.loader import RunConfig
from ..data.collator import PairwiseCollator
from ..data.packing import pair_row_lengths
from ..errors import CheckpointError
from ..eval.plots import plot_history
from ..models import checkpoint  # module attribute: tests replace `save_checkpoint` to simulate a full disk
from ..models.modality import select_model_inputs
from ..models.pair_attention import prepare_pair_packing
from .distributed import keep_lm_head_whole


class _KeepLmHeadWhole(TrainerCallback):
    """ZeRO-3: once the engine exists, keep a frozen LM head gathered (`train.distributed.keep_lm_head_whole`)."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            keep_lm_head_whole(model)


class DiscoTrainer(Trainer):
    """Base trainer for all stages. `model` is a `ModelWithHeads`."""

    def __init__(self, model: torch.nn.Module, run_config: RunConfig, **kwargs: Any) -> None:
        kwargs.setdefault("args", run_config.training)
        super().__init__(model=model, **kwargs)
        self.run_config = run_config
        self.finetuning_args = run_config.finetuning
        self.plan = run_config.plan  # every decision the config implies (`config.plan`), made once
        self._stored_metrics: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        self.pack_pairs = run_config.data.pack_pairs
        if self.pack_pairs:
            self._enable_pair_packing(model)
        if (getattr(self.args, "hf_deepspeed_config", None) is not None
                        and self.args.hf_deepspeed_config.is_zero3()):  # fmt: skip
            self.add_callback(_KeepLmHeadWhole())
        # The beta head all-reduces its own centring statistics across ranks (models/heads.py `_global_sum`).

    # ---- speed switches (docs/performance.md) ----------------------------------------------------------

    def _enable_pair_packing(self, model: torch.nn.Module) -> None:
        """`pack_pairs`: check the model can take packed pairs, and make the pairwise collator pack them."""

        prepare_pair_packing(model)
        collator = self.data_collator
        while collator is not None and not isinstance(collator, PairwiseCollator):
            collator = getattr(collator, "inner", None)  # stage wrappers keep the pairwise collator as `inner`
        if collator is not None:
            collator.pack_pairs = True

    def _get_train_sampler(self, train_dataset=None):
        """`group_by_length` (ours, or `train_sampling_strategy: group_by_length`): pairs of similar length together.

        The Trainer's own version would look for an `input_ids` column, which pairwise rows do not have; lengths
        here are the row length each pair pads its batch to, in the layout in use.
        """
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        wanted = self.run_config.data.group_by_length
        if (wanted or self.args.train_sampling_strategy == "group_by_length") and dataset is not None:
            from transformers.trainer_pt_utils import LengthGroupedSampler

            return LengthGroupedSampler(
                self.args.train_batch_size * self.args.gradient_accumulation_steps,
                dataset=dataset,
                lengths=pair_row_lengths(dataset, self.pack_pairs),
            )
        return super()._get_train_sampler(train_dataset)

    # ---- multimodal inputs ---------------------------------------------------------------------------

    def media_inputs(self, inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The batch's media inputs that the model takes (`pixel_values`, `image_grid_thw`, `input_features`, ...,
        per `ModelWithHeads.supported_parameters`); {} for a text model."""

        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        return select_model_inputs(inputs, getattr(model, "supported_parameters", ()))

    # ---- metrics -------------------------------------------------------------------------------------

    def store_metrics(self, metrics: dict[str, float | torch.Tensor], train_eval: Literal["train", "eval"] = "train"):
        """Keep per-step values until the next `log()`, which reports their mean."""
        for key, value in metrics.items():
            if isinstance(value, torch.Tensor):
                value = value.detach().float().mean().item()
            self._stored_metrics[train_eval][key].append(float(value))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        train_eval = "train" if "loss" in logs else "eval"
        prefix = "eval_" if train_eval == "eval" else ""
        for key, values in self._stored_metrics[train_eval].items():
            # NaN marks a step with nothing to measure (accuracy over a micro-batch whose pairs all tie): left out,
            # so one such micro-batch does not turn the interval's mean into NaN; a key with no value is not logged.
            kept = [v for v in values if not math.isnan(v)]
            if kept:
                logs[prefix + key] = sum(kept) / len(kept)
        self._stored_metrics[train_eval].clear()
        super().log(logs, start_time)

    # ---- the steps every stage's workflow runs ------------------------------------------------------

    def train_and_save(self) -> dict[str, float]:
        """Train (resuming when `resume_from_checkpoint` is set), save model + state + `train_results.json`."""
        try:
            result = self.train(resume_from_checkpoint=self.args.resume_from_checkpoint)
            self.save_model()
            self.save_state()
            self.log_metrics("train", result.metrics)
            self.save_metrics("train", result.metrics)
        except OSError as e:
            raise self._write_error(e) from None
        return result.metrics

    def _write_error(self, error: OSError) -> CheckpointError:
        """A CheckpointError naming the path that could not be written and the last checkpoint that was."""
        from transformers.trainer_utils import get_last_checkpoint

        path = error.filename or self.args.output_dir
        try:
            last = get_last_checkpoint(self.args.output_dir) if os.path.isdir(self.args.output_dir) else None
        except OSError:
            last = None
        kept = (
            f"The last checkpoint written, {last}, is intact: after fixing the folder, continue with "
            f"`resume_from_checkpoint: {last}`."
            if last
            else "No checkpoint was written before (set `save_strategy: steps` and `save_steps` to keep progress)."
        )
        return CheckpointError(f"Could not write {path!r} under `output_dir: {self.args.output_dir}` "
                               f"({error.strerror or error}) at step {self.state.global_step}. {kept}")  # fmt: skip

    def evaluate_and_save(self) -> dict[str, float]:
        """Evaluate on `eval_dataset`, print and save `eval_results.json`."""
        metrics = self.evaluate(metric_key_prefix="eval")
        self.log_metrics("eval", metrics)
        try:
            self.save_metrics("eval", metrics)
        except OSError as e:
            raise self._write_error(e) from None
        return metrics

    def plot_history(self, plots: list[tuple[str, str, list[str]]]) -> None:
        """Write `output_dir/plots/<file>` for each (file, title, logged keys) on the main process."""

        if not (self.finetuning_args.plot_loss and self.is_world_process_zero()):
            return
        for file_name, title, keys in plots:
            plot_history(self.state.log_history, keys, os.path.join(self.args.output_dir, "plots", file_name), title)

    # ---- optimizer -----------------------------------------------------------------------------------

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer, with each head whose learning-rate ratio is not 1 (`RunPlan.head_lr_ratios`:
        `beta_head_lr_ratio`, `variance_head_lr_ratio`) in groups of its own at `learning_rate * ratio`."""
        opt_model = self.model if model is None else model
        ratios = {f"{name}.": r for name, r in self.plan.head_lr_ratios.items() if r != 1.0}
        if self.optimizer is not None or not ratios:
            return super().create_optimizer(model)
        named = [(n, p) for n, p in opt_model.named_parameters() if p.requires_grad]

        def prefix_of(name: str) -> str | None:
            return next((prefix for prefix in ratios if name.startswith(prefix)), None)

        decay = set(self.get_decay_parameter_names(opt_model))
        groups: list[dict[str, Any]] = []
        lr = self.args.learning_rate
        for prefix, ratio in ((None, 1.0), *ratios.items()):
            for use_decay in (True, False):
                params = [p for n, p in named if prefix_of(n) == prefix and (n in decay) == use_decay]
                if params:
                    groups.append(
                        {"params": params, "weight_decay": self.args.weight_decay if use_decay else 0.0,
                         "lr": lr * ratio}
                    )  # fmt: skip
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        optimizer_kwargs.pop("lr", None)
        self.optimizer = optimizer_cls(groups, lr=lr, **optimizer_kwargs)
        return self.optimizer

    # ---- checkpoints ---------------------------------------------------------------------------------

    def _unwrapped(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        # DeepSpeed ZeRO-3 and FSDP hand over the gathered full state dict: the module's own holds only shards.
        checkpoint.save_checkpoint(
            self._unwrapped(), output_dir, tokenizer=self.processing_class, state_dict=state_dict or None
        )
        self.run_config.save(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        checkpoint.load_checkpoint_weights(model if model is not None else self._unwrapped(), resume_from_checkpoint)

    def _load_best_model(self) -> None:
        if self.is_deepspeed_enabled:  # the engine reloads its own (possibly sharded) checkpoint
            return super()._load_best_model()
        if self.state.best_model_checkpoint:
            self._load_from_checkpoint(self.state.best_model_checkpoint)
