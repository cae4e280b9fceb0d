"""The GRPO keys (`GRPOArguments`): only with `stage: grpo`, in range, and every `reward_funcs` entry importable —
all before any model loads. `resolve_reward_funcs` is the one reader of `reward_funcs` (the trainer calls it too)."""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
from collections.abc import Callable

from ..losses.grpo import SCALE_REWARDS, scale_rewards_mode
from .finetuning_groups import GRPOArguments
from .schema import FinetuningArguments

GRPO_ONLY_KEYS = tuple(f.name for f in dataclasses.fields(GRPOArguments))


class RewardFuncError(ValueError):
    """A `reward_funcs` entry that cannot be used; the message names it."""


def reward_func_names(value: str | list | None) -> list[str]:
    """`reward_funcs` as a list of `module:function` names (a YAML list, or one comma-separated string)."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    return [str(item).strip() for item in items if str(item).strip()]


def resolve_reward_funcs(value: str | list | None) -> list[Callable]:
    """Import each `module:function` of `reward_funcs`. Raises RewardFuncError naming the first bad entry."""
    funcs = []
    if os.getcwd() not in sys.path:  # a module beside the YAML one runs from, whichever launcher started Python
        sys.path.append(os.getcwd())
    for name in reward_func_names(value):
        module_name, _, attr = name.partition(":")
        if not module_name or not attr:
            raise RewardFuncError(f"`reward_funcs` entry {name!r} is not `module:function` (e.g. `my_rewards:length`).")
        try:
            module = importlib.import_module(module_name)
        except Exception as e:  # an import error of the user's module, whatever it raised
            raise RewardFuncError(
                f"`reward_funcs` entry {name!r}: module `{module_name}` cannot be imported ({type(e).__name__}: "
                f"{' '.join(str(e).split())}). Put it on PYTHONPATH (or in the folder you run from)."
            ) from None
        func = getattr(module, attr, None)
        if not callable(func):
            raise RewardFuncError(
                f"`reward_funcs` entry {name!r}: module `{module_name}` has no function `{attr}`"
                f"{' (it is not callable)' if func is not None else ''}. A reward function takes (prompts, "
                "completions, **columns) and returns one float per completion (TRL's signature)."
            )
        funcs.append(func)
    return funcs


def validate_grpo(ft: FinetuningArguments, training: dict, fail) -> None:
    """GRPO's own keys (the shared PPO keys are checked by `validate._validate_ppo`)."""
    if ft.stage != "grpo":
        defaults = GRPOArguments()
        changed = [k for k in GRPO_ONLY_KEYS if getattr(ft, k) != getattr(defaults, k)]
        if changed:
            fail(
                f"{', '.join(f'`{k}`' for k in changed)} appl{'ies' if len(changed) == 1 else 'y'} to `stage: grpo` "
                f"only, not `stage: {ft.stage}`. Remove {'it' if len(changed) == 1 else 'them'} or set `stage: grpo`."
            )
        return
    try:
        funcs = resolve_reward_funcs(ft.reward_funcs)
    except RewardFuncError as e:
        fail(str(e))
    if not ft.reward_model and not funcs:
        fail(
            "`stage: grpo` needs a reward: `reward_model` (a reward-model directory, e.g. the output of "
            "examples/rm_bt.yaml) and/or `reward_funcs` (Python functions `module:function`)."
        )
    sources = int(bool(ft.reward_model)) + len(funcs)
    if ft.reward_weights is not None:
        weights = ft.reward_weights if isinstance(ft.reward_weights, list) else [ft.reward_weights]
        if len(weights) != sources or not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights):
            fail(
                f"`reward_weights` is {ft.reward_weights!r}; it must be a list of {sources} number(s): one for the "
                "reward model (first, when `reward_model` is set) and one per `reward_funcs` entry."
            )
    if ft.num_generations < 2:
        fail(f"`num_generations` is {ft.num_generations}; a group needs at least 2 completions per prompt.")
    completions = int(training.get("per_device_train_batch_size", 8)) * int(
        training.get("gradient_accumulation_steps", 1)
    )
    if completions % ft.num_generations:
        fail(
            f"`num_generations: {ft.num_generations}` must divide the completions of one GRPO step per device: "
            f"per_device_train_batch_size x gradient_accumulation_steps = {completions}."
        )
    if ft.num_iterations < 1:
        fail(f"`num_iterations` is {ft.num_iterations}; it must be a positive integer.")
    if scale_rewards_mode(ft.scale_rewards) not in SCALE_REWARDS:
        fail(f"`scale_rewards` is {ft.scale_rewards!r}; it must be one of group, batch, none (or true / false).")
    if ft.epsilon <= 0:
        fail(f"`epsilon` is {ft.epsilon}; it must be positive.")
    if ft.epsilon_high is not None and ft.epsilon_high < ft.epsilon:
        fail(f"`epsilon_high` is {ft.epsilon_high}; it must be at least `epsilon` ({ft.epsilon}).")
    if ft.uncertainty_shrinkage < 0:
        fail(f"`uncertainty_shrinkage` is {ft.uncertainty_shrinkage}; it must be non-negative.")
    if ft.uncertainty_shrinkage > 0 and not ft.reward_model:
        fail("`uncertainty_shrinkage` weights advantages by the reward model's variance, but no `reward_model` is set.")
    if ft.pref_beta < 0:
        fail(f"`pref_beta` (TRL's `beta`) is {ft.pref_beta}; the KL coefficient must be non-negative (0: no KL).")
