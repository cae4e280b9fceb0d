"""`PPOTrainer`: actor-critic RLHF on a `ModelWithHeads` (policy + value head as critic), against a frozen
reward model, with a per-token KL penalty to a frozen reference.

One PPO step:
1. rollout (eval mode, no gradient): sample responses to a batch of left-padded prompts; read the policy's
   log-probs and values, the reference's log-probs and the reward model's score of each sampled token;
2. rewards: `-kl_coef(x) * kl_t` per token plus the score on the last token; GAE advantages and returns;
   advantages whitened;
3. optimisation (train mode): `ppo_epochs` passes over the rollout in shuffled mini-batches, each an optimizer
   step over `gradient_accumulation_steps` micro-batches, minimising
   `policy loss + vf_coef * value loss (+ the beta head's controller loss with use_dynamic_beta)`.

The loop is `transformers.Trainer.train()` itself, driven through its public surface (as TRL's online trainers
do): `get_train_dataloader` yields one PPO step per optimizer step, `training_step` runs the step, taking every
optimizer step but the last, which the Trainer takes (so DDP / DeepSpeed / FSDP wrapping, clipping, the schedule,
callbacks, logging, checkpoints with optimizer / scheduler / RNG state and resuming are all the Trainer's own).
The learning-rate schedule advances once per PPO step; `max_steps` and `global_step` count PPO steps.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers import GenerationConfig, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from ...data.position import turn_end_suffix
from ...data.prompts import PromptSchedule, prompt_rows
from ...errors import ConfigError
from ...losses.ppo import (
    beta_controller_loss,
    clipped_policy_loss,
    clipped_value_loss,
    masked_mean,
)
from ...models.generation import stop_token_ids
from ..base_trainer import DiscoTrainer
from ..frozen import disable_dropout, frozen_copy
from .collect import RolloutCollector
from .policy import PPOPolicy
from .rollout import Rollout
from .samples import SAMPLES_FILE, append_samples, show_samples


def _forked_rng(seed: int):
    """Run a block with its own seeded RNG (CPU, and the current GPU), leaving the run's random stream untouched."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    stack = contextlib.ExitStack()
    stack.enter_context(torch.random.fork_rng(devices=devices))
    torch.manual_seed(seed)
    return stack


class _LogLastStep(TrainerCallback):
    """Log the last PPO step whatever `logging_steps` says, so that the plots reach the end of the run."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_log = True


class PPOTrainer(RolloutCollector, DiscoTrainer):
    """PPO on a `ModelWithHeads` with a value head (the critic) and, optionally, a beta head.

    Args:
        model: the policy; its `value_head` is the critic. Its `beta_head`, when present, is trained as a per-prompt
            KL controller only with `use_dynamic_beta: true`; otherwise it is never run and changes nothing.
        run_config: the resolved `RunConfig`.
        reward_model: the frozen reward `ModelWithHeads` (see `reward_model.load_reward_model`).
        ref_model: frozen reference for full fine-tuning; None under LoRA (the policy with adapters disabled) or
            to use a frozen copy of the policy.
        true_reward: optional `text -> float` (builtin:synthetic's known reward), logged as `objective/true_reward`.
        **kwargs: passed to `transformers.Trainer` (train_dataset and eval_dataset of tokenised prompts,
            processing_class, callbacks).
    """

    def __init__(
        self,
        model: nn.Module,
        run_config,
        reward_model: nn.Module,
        ref_model: nn.Module | None = None,
        true_reward: Callable[[str], float] | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("data_collator", lambda rows: rows)  # prompts are batched by `PromptSchedule`
        if not isinstance(model, PPOPolicy):
            model = PPOPolicy.from_model(model)
        super().__init__(model, run_config, **kwargs)
        ft = self.finetuning_args
        policy = self._policy()
        if self.uses_critic and policy.value_head is None:
            raise ValueError("PPO needs a policy with a value head (load it with add_value_head=True)")
        tokenizer = self.processing_class
        if tokenizer is None or tokenizer.pad_token_id is None:
            raise ConfigError("PPO pads prompts, but the tokenizer has no pad token; set one (e.g. the EOS token).")
        # The whole policy, value head included: with `head_dropout > 0` the critic's rollout values and its
        # training values would otherwise come from different networks.
        disable_dropout(policy)
        # The saved policy's value head is a critic, not a reward: `score` and `reward_model:` refuse it.
        if self.uses_critic:
            policy.heads_config["value_head_kind"] = "critic"
        policy.epistemic = None  # an epistemic estimator inherited from a reward-model init is not the policy's
        if policy.beta_head is not None and self.plan.beta_source != "head":
            # Present but unused: frozen, so that DDP does not wait for gradients it will never get.
            policy.beta_head.requires_grad_(False)
        self.true_reward = true_reward
        self.pad_token_id = int(tokenizer.pad_token_id)
        self.stop_ids = stop_token_ids(tokenizer, getattr(policy.causal_lm, "generation_config", None))
        if not self.stop_ids:
            raise ConfigError("PPO needs an end-of-sequence token to end responses, but the tokenizer has no EOS.")
        # What the chat template writes after the stop token (ChatML: "\n"): appended before the reward is read,
        # so the reward model scores the position it was trained on (`data.position`).
        self.turn_suffix = turn_end_suffix(tokenizer, self.stop_ids)
        self.generation_config = GenerationConfig(
            do_sample=True,
            max_new_tokens=ft.max_new_tokens,
            temperature=ft.temperature,
            top_p=ft.top_p,
            top_k=ft.top_k,
            # Set explicitly so that a checkpoint's generation_config.json cannot change the sampling policy.
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            min_new_tokens=0,
            num_beams=1,
            eos_token_id=self.stop_ids,
            pad_token_id=self.pad_token_id,
            use_cache=True,
        )

        self.reward_model = None  # GRPO may score with reward functions only
        if reward_model is not None:
            self.reward_model = self.accelerator.prepare_model(reward_model.eval(), evaluation_mode=True)
        self.uses_reference = self.needs_reference()
        if not self.uses_reference:
            ref_model = None
        elif ref_model is None and not policy.is_peft:
            ref_model = frozen_copy(PPOPolicy(policy.backbone))  # the backbone only: no heads
        self.ref_model = None
        if ref_model is not None:
            ref_model = ref_model if isinstance(ref_model, PPOPolicy) else PPOPolicy.from_model(ref_model)
            ref_model.requires_grad_(False)
            self.ref_model = self.accelerator.prepare_model(ref_model.eval(), evaluation_mode=True)

        micro = self.args.per_device_train_batch_size
        self.mini_batch_size = micro * self.args.gradient_accumulation_steps
        self.rollout_batch_size = self.mini_batch_size * ft.ppo_buffer_size  # prompts per PPO step and process
        self.update_epochs = ft.ppo_epochs
        self.samples_path = os.path.join(self.args.output_dir, SAMPLES_FILE)
        self.last_samples: list[dict[str, Any]] = []  # the samples of the last logged step
        self._step_samples: list[dict[str, Any]] = []  # the current step's samples
        self.add_callback(_LogLastStep())

    # ---- pieces --------------------------------------------------------------------------------------

    uses_critic = True  # the policy's value head is trained (GRPO: no critic)

    def needs_reference(self) -> bool:
        """Whether the reference is computed (PPO: always, for the KL penalty)."""
        return True

    def _policy(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)

    def _reference(self) -> tuple[nn.Module, contextlib.AbstractContextManager]:
        """(model, context) computing the reference: the frozen copy, or the policy with LoRA adapters disabled."""
        if self.ref_model is not None:
            return self.accelerator.unwrap_model(self.ref_model), contextlib.nullcontext()
        policy = self._policy()
        return policy, policy.disable_adapter()

    # ---- optimisation --------------------------------------------------------------------------------

    def ppo_loss(self, model: nn.Module, batch: Rollout) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The micro-batch loss `pg_loss + vf_coef * vf_loss (+ beta controller loss)` and its statistics."""
        ft = self.finetuning_args
        mask = batch.response_mask
        # Through the module call, so DDP / DeepSpeed wrappers see every parameter used (LM head, value head and
        # beta head included) inside the forward.
        out = model(
            batch.input_ids, batch.attention_mask, response_ids=batch.response_ids,
            prompt_length=batch.query_ids.shape[1], temperature=ft.temperature, with_entropy=True,
            prompt_features=batch.ref_prompt_hidden if self.plan.beta_source == "head" else None,
        )  # fmt: skip
        logprobs, values, entropy = out.logprobs, out.values, out.entropy
        pg_loss, pg_clipfrac, approxkl = clipped_policy_loss(
            logprobs, batch.logprobs, batch.advantages, mask, ft.cliprange
        )
        vf_loss, vf_clipfrac = clipped_value_loss(values, batch.values, batch.returns, mask, ft.cliprange_value)
        loss = pg_loss + ft.vf_coef * vf_loss
        stats = {
            "loss/policy": pg_loss.detach(),
            "val/vf_loss": vf_loss.detach(),
            "policy/clipfrac": pg_clipfrac,
            "policy/approxkl": approxkl,
            "policy/entropy": masked_mean(entropy, mask),
            "policy/ratio": masked_mean(torch.exp(logprobs.detach() - batch.logprobs), mask),
            "val/clipfrac": vf_clipfrac,
            "val/mean": masked_mean(values.detach(), mask),
        }
        if self.plan.beta_source == "head":
            beta_loss = beta_controller_loss(out.beta_scale, batch.kl.sum(dim=1), ft.target_kl)
            loss = loss + beta_loss
            stats["beta/loss"] = beta_loss.detach()
        stats["loss/total"] = loss.detach()
        return loss, stats

    def update_loss(self, model: nn.Module, batch: Rollout) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The micro-batch loss the update minimises (`ppo_loss`; GRPO's trainer overrides it)."""
        return self.ppo_loss(model, batch)

    def optimize(
        self, model: nn.Module, rollout: Rollout, leave_last_step: bool = False
    ) -> tuple[dict[str, float], float | None]:
        """`ppo_epochs` (GRPO: `num_iterations`) passes of mini-batch updates over one rollout. Returns (mean
        statistics, last grad norm).

        With `leave_last_step` the last mini-batch's gradients are left in place and its optimizer step is not
        taken: inside `Trainer.train()` the Trainer takes it (clipping, logging `grad_norm`, stepping the optimizer
        and the learning-rate schedule once per PPO step); the grad norm returned is then None.
        """
        micro = self.args.per_device_train_batch_size
        collected: dict[str, list[torch.Tensor]] = defaultdict(list)
        grad_norm = None
        model.train()
        starts = range(0, len(rollout), self.mini_batch_size)
        for epoch in range(self.update_epochs):
            order = torch.randperm(len(rollout))
            for start in starts:
                mini_batch = order[start : start + self.mini_batch_size]
                micro_batches = mini_batch.split(micro)
                for i, index in enumerate(micro_batches):
                    batch = rollout.select(index.to(rollout.query_ids.device))
                    last = i == len(micro_batches) - 1
                    sync = (
                        contextlib.nullcontext
                        if last or self.is_deepspeed_enabled
                        else functools.partial(self.accelerator.no_sync, model=model)
                    )
                    with sync():
                        with self.compute_loss_context_manager():
                            loss, stats = self.update_loss(model, batch)
                        self.accelerator.backward(loss / len(micro_batches))
                    for key, value in stats.items():
                        collected[key].append(value.float())
                if leave_last_step and epoch == self.update_epochs - 1 and start == starts[-1]:
                    break
                grad_norm = self._optimizer_step(model)
        means = {key: float(torch.stack(values).mean()) for key, values in collected.items()}
        return means, grad_norm

    def _optimizer_step(self, model: nn.Module) -> float | None:
        """Clip, step and zero the gradients, with the Trainer's optimizer callbacks. Returns the grad norm."""
        grad_norm = None
        if self.args.max_grad_norm and self.args.max_grad_norm > 0:
            # None under DeepSpeed, whose engine clips inside its own step.
            grad_norm = self.accelerator.clip_grad_norm_(model.parameters(), self.args.max_grad_norm)
        self.control = self.callback_handler.on_pre_optimizer_step(self.args, self.state, self.control)
        self.optimizer.step()
        self.control = self.callback_handler.on_optimizer_step(self.args, self.state, self.control)
        model.zero_grad()
        return None if grad_norm is None else float(grad_norm)

    # ---- the loop: Trainer.train() over PPO steps ------------------------------------------------------

    def prompt_schedule(self) -> PromptSchedule:
        """Which prompts each PPO step rolls out on this process (a fixed order per epoch: resumable)."""
        return PromptSchedule(
            len(self.train_dataset), self.rollout_batch_size, self.args.seed,
            self.accelerator.num_processes, self.accelerator.process_index,
        )  # fmt: skip

    def get_train_dataloader(self) -> DataLoader:
        """One epoch of PPO steps, as the Trainer's loop consumes them.

        The Trainer takes `gradient_accumulation_steps` items per optimizer step, so each PPO step is that many
        items; the last one carries the step (`training_step`). The rows themselves come from `PromptSchedule`,
        per process, so the loader is not sharded by accelerate. It draws nothing from the global RNG (its own
        generator): the run's random stream is the rollouts' and the updates', as a resumed run replays it.
        """
        schedule = self.prompt_schedule()
        accumulation = self.args.gradient_accumulation_steps
        parts = [
            {"ppo_last": i % accumulation == accumulation - 1} for i in range(schedule.steps_per_epoch * accumulation)
        ]
        return DataLoader(parts, batch_size=1, collate_fn=lambda rows: rows[0], generator=torch.Generator())

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch=None) -> torch.Tensor:
        """One PPO step (`ppo_last` item): roll out this step's prompts, then optimise on them.

        Every optimizer step of the step but the last is taken here; the last is the Trainer's own. Returns the
        mean total loss of the step, which the Trainer averages into the logged `loss`.
        """
        if not inputs["ppo_last"]:
            return torch.zeros((), device=self.args.device)
        rows = prompt_rows(self.train_dataset, self._schedule.indices(self.state.global_step))
        rollout = self.make_rollout(rows)
        rollout_stats, self._step_samples = self.rollout_report(rollout)
        update_stats, _ = self.optimize(model, rollout, leave_last_step=True)
        self.store_metrics({**rollout_stats, **update_stats}, "train")
        return torch.tensor(update_stats["loss/total"], device=self.args.device)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds `episode` (prompts rolled out so far, all processes) to the train logs, and writes the step's
        samples to `samples.jsonl` whenever the train metrics are logged. The Trainer's `train_samples_per_second`
        counts one mini-batch per optimizer step; a PPO step rolls out `ppo_buffer_size` of them."""
        if "train_samples_per_second" in logs:
            logs["train_samples_per_second"] = round(
                logs["train_samples_per_second"] * self.finetuning_args.ppo_buffer_size, 3
            )
        if "loss" in logs and self.is_in_train:
            logs["episode"] = float(self.state.global_step * self.rollout_batch_size * self.accelerator.num_processes)
            if self._step_samples:
                self.last_samples = self._step_samples
                if self.is_world_process_zero():
                    append_samples(self.samples_path, self.state.global_step, self._step_samples)
        super().log(logs, start_time)

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None):
        """Run PPO for `max_steps` PPO steps (or `num_train_epochs` passes over the prompts): the Trainer's own
        loop, one optimizer-step-with-schedule per PPO step (see `training_step`)."""
        args = self.args
        if self.train_dataset is None:
            raise ConfigError("PPO needs prompts to train on: set `dataset`.")
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(args.output_dir)
            if resume_from_checkpoint is None:
                raise ConfigError(
                    f"`resume_from_checkpoint: true` but {args.output_dir!r} holds no checkpoint-* folder."
                )
        self._schedule = self.prompt_schedule()
        if self._schedule.steps_per_epoch == 0:
            raise ConfigError(
                f"The dataset has {len(self.train_dataset)} prompts, fewer than one PPO rollout needs: "
                f"per_device_train_batch_size ({args.per_device_train_batch_size}) x gradient_accumulation_steps "
                f"({args.gradient_accumulation_steps}) x ppo_buffer_size ({self.finetuning_args.ppo_buffer_size}) x "
                f"{self.accelerator.num_processes} process(es) = "
                f"{self.rollout_batch_size * self._schedule.num_processes}. Use more prompts or smaller batches."
            )
        output = super().train(resume_from_checkpoint or None, trial, ignore_keys_for_eval)
        if self.is_world_process_zero() and self.last_samples:
            show_samples(
                f"{self.finetuning_args.stage.upper()} samples at step {self.state.global_step}", self.last_samples
            )
        return output

    # ---- evaluation ----------------------------------------------------------------------------------

    def evaluate_rollouts(self, dataset, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Roll out every prompt of `dataset` once (seeded sampling, the run's RNG untouched) and average the
        rollout metrics over them; this process's share of rows under distributed runs."""
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        indices = list(range(rank, len(dataset), world))
        size = max(1, self.rollout_batch_size)
        totals: dict[str, float] = defaultdict(float)
        counts: dict[str, int] = defaultdict(int)
        with _forked_rng(self.args.seed):
            for start in range(0, len(indices), size):
                rows = prompt_rows(dataset, indices[start : start + size])
                metrics, _ = self.rollout_report(self.make_rollout(rows))
                for key, value in metrics.items():
                    if not key.startswith("beta/"):
                        totals[key] += value * len(rows)
                        counts[key] += len(rows)
        return {f"{metric_key_prefix}_{key}": totals[key] / counts[key] for key in totals}

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Rollout metrics of the current policy on the eval prompts (`eval_objective/scores`, `.../kl`, ...)."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ConfigError("Evaluation needs prompts: set `eval_dataset` or `val_size`.")
        metrics = self.evaluate_rollouts(dataset, metric_key_prefix)
        self.log(dict(metrics))
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics
