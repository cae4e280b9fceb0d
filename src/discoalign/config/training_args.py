"""The `transformers.TrainingArguments` side of a config, checked once before any model loads: the arguments
themselves (built here, once), their reporting integrations, and the DeepSpeed settings a run can use."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from .finetuning_groups import ONLINE_STAGES
from .schema import FinetuningArguments


def build_training_arguments(training: dict[str, Any], source: str) -> Any:
    """Build the `transformers.TrainingArguments` once, here, and check what it accepts but a run cannot use.

    TrainingArguments takes `per_device_train_batch_size: 0`, `max_steps: -3` or `report_to: tensorboard` without
    the package, and the run fails (or silently trains epochs) later, after data loading. Raises ConfigError.
    """

    def fail(msg: str) -> None:
        raise ConfigError(f"In {source}: {msg}")

    try:
        from transformers import TrainingArguments

        args = TrainingArguments(**training)
    except (ValueError, TypeError, ImportError) as e:
        msg = str(e).strip().replace("\n", " ")
        raise ConfigError(f"A transformers.TrainingArguments key in {source} is invalid: {msg}") from None

    for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if getattr(args, key) < 1:
            fail(f"`{key}` is {getattr(args, key)}; it must be a positive integer.")
    # The Trainer trains `max_steps` steps when it is positive, else `num_train_epochs` epochs: only the default -1
    # means "use epochs"; 0 or -3 would silently train the epochs instead of what was written.
    if args.max_steps != -1 and args.max_steps < 1:
        fail(f"`max_steps` is {args.max_steps}; it must be a positive number of optimizer steps, or -1 (the "
             "default) to train for `num_train_epochs`.")  # fmt: skip
    if args.do_train and args.max_steps == -1 and not args.num_train_epochs > 0:
        fail(f"`num_train_epochs` is {args.num_train_epochs}; it must be positive (or set `max_steps`).")
    if args.learning_rate < 0:
        fail(f"`learning_rate` is {args.learning_rate}; it must be non-negative.")
    _check_report_to(args.report_to, fail)
    if args.dataloader_pin_memory and "dataloader_pin_memory" not in training:
        import torch

        # Pinned memory speeds copies to an accelerator; without one torch warns on every DataLoader it builds.
        args.dataloader_pin_memory = torch.accelerator.is_available()
    if args.push_to_hub:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            fail("`push_to_hub: true` uploads the model to the Hugging Face Hub, but this process runs in offline mode "
                 "(the environment variable HF_HUB_OFFLINE is set), so it can reach no hub. Unset HF_HUB_OFFLINE "
                 "(and log in with `hf auth login`) to push, or set `push_to_hub: false` and upload the output "
                 "folder later.")  # fmt: skip
    return args


def _check_report_to(report_to: list[str] | None, fail) -> None:
    """Each `report_to` integration must be one transformers knows and whose package is installed."""
    from transformers.integrations.integration_utils import (
        INTEGRATION_TO_CALLBACK,
        get_available_reporting_integrations,
    )

    available = set(get_available_reporting_integrations())
    for name in report_to or []:
        if name in ("none", "all"):
            continue
        if name not in INTEGRATION_TO_CALLBACK:
            fail(f"`report_to: {name}` is not an integration transformers knows; use one of "
                 f"{', '.join(sorted(INTEGRATION_TO_CALLBACK))}, or `none`.")  # fmt: skip
        if name == "tensorboard":
            import importlib.util

            if name not in available or not any(importlib.util.find_spec(m) for m in ("tensorboard", "tensorboardX")):
                fail("`report_to: tensorboard` needs the `tensorboard` package, which is not installed; it is an "
                     "optional extra: pip install 'discoalign[tensorboard]' (or pip install tensorboard). Or set "
                     "`report_to: none`.")  # fmt: skip
            continue
        if name not in available:
            package = {"comet_ml": "comet_ml", "azure_ml": "azureml-core"}.get(name, name)
            fail(f"`report_to: {name}` needs the `{package}` package, which is not installed. Install it "
                 f"(`pip install {package}`), or set `report_to: none`.")  # fmt: skip


def validate_deepspeed(ft: FinetuningArguments, training: dict[str, Any], fail) -> None:
    """`deepspeed: <json>`: the package is installed, the file reads as JSON, and the stage supports the run.

    Checked here because `transformers.TrainingArguments` would otherwise raise on the missing package or file
    with a traceback, and PPO under ZeRO-3 would only fail once rollouts start.
    """
    config = training.get("deepspeed")
    if not config:
        return
    import importlib.util
    import json
    import os

    if importlib.util.find_spec("deepspeed") is None:
        fail(f"`deepspeed: {config}` is set but DeepSpeed is not installed. Install it with "
             "`pip install 'discoalign[deepspeed]'` (on a machine without a CUDA toolkit: "
             "`DS_BUILD_OPS=0 pip install 'discoalign[deepspeed]'`), or remove `deepspeed`.")  # fmt: skip
    if isinstance(config, str):
        path = os.path.expanduser(config)
        if not os.path.isfile(path):
            fail(f"`deepspeed: {config}`: no such file. Name a DeepSpeed JSON config such as "
                 "examples/deepspeed/ds_z2_config.json or ds_z3_config.json.")  # fmt: skip
        try:
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, ValueError) as e:
            fail(f"`deepspeed: {path}` cannot be read as JSON ({e}).")
    if not isinstance(config, dict):
        fail(f"`deepspeed` must name a JSON file (or be a mapping), not {type(config).__name__}.")
    stage = (config.get("zero_optimization") or {}).get("stage", 0)
    if ft.stage in ONLINE_STAGES and stage == 3:
        fail(
            f"`stage: {ft.stage}` does not run under DeepSpeed ZeRO-3: ZeRO-3 keeps a shard of every weight on each "
            "process, and PPO's rollouts generate token by token, which would have to gather the whole policy "
            "for every token (and keep all processes generating in lockstep). Use ZeRO-2 "
            "(examples/deepspeed/ds_z2_config.json), plain data parallelism (no `deepspeed`), or LoRA to fit the "
            "model; see docs/distributed.md."
        )
    zero = config.get("zero_optimization") or {}
    if stage == 3 and not (zero.get("stage3_gather_16bit_weights_on_model_save")
                           or zero.get("gather_16bit_weights_on_model_save")):  # fmt: skip
        # Without it the Trainer saves only DeepSpeed's sharded checkpoint, and our writer would find the module's
        # own weights empty (each rank holds shards): the saved model and heads would be unusable.
        fail(
            'DeepSpeed ZeRO-3 needs `"stage3_gather_16bit_weights_on_model_save": true` under '
            "`zero_optimization` in the `deepspeed` JSON: discoalign saves the gathered weights and heads so that "
            "the output loads anywhere (examples/deepspeed/ds_z3_config.json sets it)."
        )
    accumulation = training.get("gradient_accumulation_steps", 1)
    if ft.stage in ONLINE_STAGES and isinstance(accumulation, int) and accumulation > 1:
        # PPO's own update loop scales and steps per mini-batch; the DeepSpeed engine would scale the loss by
        # 1/gradient_accumulation_steps again and step on its own count of micro-batches (tested: other updates).
        fail(
            f"`stage: {ft.stage}` under DeepSpeed needs `gradient_accumulation_steps: 1` (got {accumulation}): PPO "
            "accumulates over its mini-batches itself and the DeepSpeed engine would scale and step a second "
            "time. Raise `per_device_train_batch_size` instead, or train PPO without `deepspeed`."
        )
