"""`run_exp`: dispatch a resolved config to its stage's workflow (LlamaFactory's `tuner.run_exp`)."""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from ..config.loader import RunConfig
from ..config.output_dir import check_resume, prepare_output_dir
from .distributed import prepare_distributed
from .dpo.workflow import DPOWorkflow
from .ppo.workflow import PPOWorkflow
from .rm.workflow import RMWorkflow
from .sft.workflow import SFTWorkflow
from .workflow import StageWorkflow

WORKFLOWS: dict[str, type[StageWorkflow]] = {
    "sft": SFTWorkflow,
    "rm": RMWorkflow,
    "dpo": DPOWorkflow,
    "ppo": PPOWorkflow,
}


def run_exp(cfg: RunConfig, callbacks: list[TrainerCallback] | None = None) -> dict[str, Any]:
    """Run the stage named by `cfg.finetuning.stage` and return its metrics."""
    args = cfg.training
    # Before any model loads: DeepSpeed's process group (ZeRO-3 shards weights as they load), quiet replicas.
    prepare_distributed(args)
    if args.do_train:
        check_resume(args.output_dir, args.resume_from_checkpoint)
    if args.should_save:  # the main process: checked before any model loads
        prepare_output_dir(
            args.output_dir,
            do_train=args.do_train,
            overwrite=cfg.finetuning.overwrite_output_dir,
            resuming=bool(args.resume_from_checkpoint),
        )
    return WORKFLOWS[cfg.finetuning.stage]().run(cfg, callbacks)
