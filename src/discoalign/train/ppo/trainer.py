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

The loop is the Trainer's own machinery: `_prepare_for_training` (accelerate: DDP / DeepSpeed / FSDP, optimizer
and scheduler), callbacks, `log`, `_save_checkpoint` (our checkpoint layout + optimizer, scheduler, RNG) and
resuming. The learning-rate schedule advances once per PPO step; `max_steps` and `global_step` count PPO steps.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import GenerationConfig
from transformers.trainer_utils import TrainOutput, get_last_checkpoint, speed_metrics

from ...errors import ConfigError
from ...losses.ppo import (
    beta_controller_loss,
    clipped_policy_loss,
    clipped_value_loss,
    masked_mean,
)
from ..base_trainer import DiscoTrainer
from ..frozen import disable_dropout, frozen_copy
from ..rm.position import turn_end_suffix
from .collect import RolloutCollector
from .policy import PPOPolicy
from .prompts import PromptSchedule, prompt_rows
from .rollout import Rollout, stop_token_ids
from .samples import SAMPLES_FILE, append_samples, show_samples


def _forked_rng(seed: int):
    """Run a block with its own seeded RNG (CPU, and the current GPU), leaving the run's random stream untouched."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    stack = contextlib.ExitStack()
    stack.enter_context(torch.random.fork_rng(devices=devices))
    torch.manual_seed(seed)
    return stack


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
        if policy.value_head is None:
            raise ValueError("PPO needs a policy with a value head (load it with add_value_head=True)")
        tokenizer = self.processing_class
        if tokenizer is None or tokenizer.pad_token_id is None:
            raise ConfigError("PPO pads prompts, but the tokenizer has no pad token; set one (e.g. the EOS token).")
        # The whole policy, value head included: with `head_dropout > 0` the critic's rollout values and its
        # training values would otherwise come from different networks.
        disable_dropout(policy)
        # The saved policy's value head is a critic, not a reward: `score` and `reward_model:` refuse it.
        policy.heads_config["value_head_kind"] = "critic"
        policy.epistemic = None  # an epistemic term inherited from a reward-model init is not the policy's
        if policy.beta_head is not None and not ft.use_dynamic_beta:
            # Present but unused: frozen, so that DDP does not wait for gradients it will never get.
            policy.beta_head.requires_grad_(False)
        self.true_reward = true_reward
        self.pad_token_id = int(tokenizer.pad_token_id)
        self.stop_ids = stop_token_ids(tokenizer, getattr(policy.causal_lm, "generation_config", None))
        if not self.stop_ids:
            raise ConfigError("PPO needs an end-of-sequence token to end responses, but the tokenizer has no EOS.")
        # What the chat template writes after the stop token (ChatML: "\n"): appended before the reward is read,
        # so the reward model scores the position it was trained on (`train.rm.position`).
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

        self.reward_model = self.accelerator.prepare_model(reward_model.eval(), evaluation_mode=True)
        if ref_model is None and not policy.is_peft:
            ref_model = frozen_copy(PPOPolicy(policy.backbone))  # the backbone only: no heads
        self.ref_model = None
        if ref_model is not None:
            ref_model = ref_model if isinstance(ref_model, PPOPolicy) else PPOPolicy.from_model(ref_model)
            ref_model.requires_grad_(False)
            self.ref_model = self.accelerator.prepare_model(ref_model.eval(), evaluation_mode=True)

        micro = self.args.per_device_train_batch_size
        self.mini_batch_size = micro * self.args.gradient_accumulation_steps
        self.rollout_batch_size = self.mini_batch_size * ft.ppo_buffer_size
        self.samples_path = os.path.join(self.args.output_dir, SAMPLES_FILE)
        self.last_samples: list[dict[str, Any]] = []

    # ---- pieces --------------------------------------------------------------------------------------

    def _policy(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)

    def _reference(self) -> tuple[nn.Module, contextlib.AbstractContextManager]:
        """(model, context) computing the reference: the frozen copy, or the policy with LoRA adapters disabled."""
        if self.ref_model is not None:
            return self.accelerator.unwrap_model(self.ref_model), contextlib.nullcontext()
        policy = self._policy()
        return policy, policy.disable_adapter()

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            self._signature_columns = ["prompt_input_ids", "prompt", "topic", "noise"]

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
            beta_features=batch.ref_prompt_hidden if ft.use_dynamic_beta else None,
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
        if ft.use_dynamic_beta:
            beta_loss = beta_controller_loss(out.beta_scale, batch.kl.sum(dim=1), ft.target_kl)
            loss = loss + beta_loss
            stats["beta/loss"] = beta_loss.detach()
        stats["loss/total"] = loss.detach()
        return loss, stats

    def optimize(self, model: nn.Module, rollout: Rollout) -> tuple[dict[str, float], float | None]:
        """`ppo_epochs` passes of mini-batch updates over one rollout. Returns (mean statistics, last grad norm)."""
        ft = self.finetuning_args
        micro = self.args.per_device_train_batch_size
        collected: dict[str, list[torch.Tensor]] = defaultdict(list)
        grad_norm = None
        model.train()
        for _ in range(ft.ppo_epochs):
            order = torch.randperm(len(rollout))
            for start in range(0, len(rollout), self.mini_batch_size):
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
                            loss, stats = self.ppo_loss(model, batch)
                        self.accelerator.backward(loss / len(micro_batches))
                    for key, value in stats.items():
                        collected[key].append(value.float())
                if self.args.max_grad_norm and self.args.max_grad_norm > 0:
                    grad_norm = self._clip_grad_norm(model)
                self.control = self.callback_handler.on_pre_optimizer_step(self.args, self.state, self.control)
                self.optimizer.step()
                self.control = self.callback_handler.on_optimizer_step(self.args, self.state, self.control)
                model.zero_grad()
        means = {key: float(torch.stack(values).mean()) for key, values in collected.items()}
        if grad_norm is not None:
            grad_norm = float(grad_norm)
        return means, grad_norm

    # ---- the loop ------------------------------------------------------------------------------------

    def num_ppo_steps(self, schedule: PromptSchedule) -> int:
        if self.args.max_steps > 0:
            return self.args.max_steps
        return max(1, math.ceil(self.args.num_train_epochs * schedule.steps_per_epoch))

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """Run PPO for `max_steps` PPO steps (or `num_train_epochs` passes over the prompts)."""
        args = self.args
        if self.train_dataset is None:
            raise ConfigError("PPO needs prompts to train on: set `dataset`.")
        if resume_from_checkpoint is False:
            resume_from_checkpoint = None
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(args.output_dir)
            if resume_from_checkpoint is None:
                raise ConfigError(
                    f"`resume_from_checkpoint: true` but {args.output_dir!r} holds no checkpoint-* folder."
                )
        self.is_in_train = True
        schedule = PromptSchedule(
            len(self.train_dataset), self.rollout_batch_size, args.seed,
            self.accelerator.num_processes, self.accelerator.process_index,
        )  # fmt: skip
        if schedule.steps_per_epoch == 0:
            raise ConfigError(
                f"The dataset has {len(self.train_dataset)} prompts, fewer than one PPO rollout needs: "
                f"per_device_train_batch_size ({args.per_device_train_batch_size}) x gradient_accumulation_steps "
                f"({args.gradient_accumulation_steps}) x ppo_buffer_size ({self.finetuning_args.ppo_buffer_size}) x "
                f"{self.accelerator.num_processes} process(es) = {self.rollout_batch_size * schedule.num_processes}. "
                "Use more prompts or smaller batches."
            )
        max_steps = self.num_ppo_steps(schedule)
        num_epochs = math.ceil(max_steps / schedule.steps_per_epoch)
        if getattr(args, "activation_checkpointing", False) or getattr(args, "gradient_checkpointing", False):
            kwargs_gc = getattr(args, "activation_checkpointing_kwargs", None) or getattr(
                args, "gradient_checkpointing_kwargs", None
            )
            self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs_gc)
        if resume_from_checkpoint is not None and not (self.is_deepspeed_enabled or self.is_fsdp_enabled):
            self._load_from_checkpoint(resume_from_checkpoint)
        self._init_training_state(max_steps, schedule.steps_per_epoch, num_epochs, resume_from_checkpoint, trial)
        model, _ = self._prepare_for_training(max_steps, None, resume_from_checkpoint)
        if resume_from_checkpoint is not None:
            self._load_rng_state(resume_from_checkpoint)

        start_time = time.time()
        first_step = self.state.global_step
        self._globalstep_last_logged = first_step
        losses_since_log: list[float] = []
        total_loss, grad_norm = 0.0, None
        self.control = self.callback_handler.on_train_begin(args, self.state, self.control)
        if args.eval_on_start and self.eval_dataset is not None and first_step == 0:
            self.evaluate()
        for step in range(first_step, max_steps):
            if step % schedule.steps_per_epoch == 0:
                self.control = self.callback_handler.on_epoch_begin(args, self.state, self.control)
            self.control = self.callback_handler.on_step_begin(args, self.state, self.control)
            rollout = self.make_rollout(prompt_rows(self.train_dataset, schedule.indices(step)))
            rollout_stats, samples = self.rollout_report(rollout)
            update_stats, grad_norm = self.optimize(model, rollout)
            self.lr_scheduler.step()
            self.state.global_step = step + 1
            self.state.epoch = schedule.epoch_of(step + 1)
            self.store_metrics({**rollout_stats, **update_stats}, "train")
            losses_since_log.append(update_stats["loss/total"])
            total_loss += update_stats["loss/total"]
            self.control = self.callback_handler.on_step_end(args, self.state, self.control)
            if (step + 1) % schedule.steps_per_epoch == 0:
                self.control = self.callback_handler.on_epoch_end(args, self.state, self.control)
            if self.state.global_step >= max_steps:
                self.control.should_log = True  # the plots should reach the last step
            if self.control.should_log and losses_since_log:
                logs: dict[str, float] = {
                    "loss": sum(losses_since_log) / len(losses_since_log),
                    "learning_rate": self._get_learning_rate(),
                    "episode": float(self.state.global_step * self.rollout_batch_size * schedule.num_processes),
                }
                if grad_norm is not None:
                    logs["grad_norm"] = grad_norm
                self.log(logs)
                losses_since_log = []
                self.last_samples = samples
                if self.is_world_process_zero() and samples:
                    append_samples(self.samples_path, self.state.global_step, samples)
            if self.control.should_evaluate and self.eval_dataset is not None:
                self.evaluate()
            self.control.should_evaluate = False
            if self.control.should_save:
                self._save_checkpoint(model, trial)
                self.control = self.callback_handler.on_save(args, self.state, self.control)
            if self.control.should_training_stop:
                break

        steps_run = self.state.global_step - first_step
        metrics = speed_metrics(
            "train", start_time, num_samples=steps_run * self.rollout_batch_size * schedule.num_processes,
            num_steps=steps_run,
        )  # fmt: skip
        metrics["train_loss"] = total_loss / max(steps_run, 1)
        self.log(dict(metrics))
        self.control = self.callback_handler.on_train_end(args, self.state, self.control)
        self.is_in_train = False
        if self.is_world_process_zero() and self.last_samples:
            show_samples(f"PPO samples at step {self.state.global_step}", self.last_samples)
        return TrainOutput(self.state.global_step, metrics["train_loss"], metrics)

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
