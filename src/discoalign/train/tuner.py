"""`run_exp`: dispatch a resolved config to its stage's workflow (LlamaFactory's `tuner.run_exp`)."""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from ..config.loader import RunConfig
from ..config.output_dir import check_resume, prepare_output_dir
from .distributed import prepare_distributed
from .dpo import run_dpo
from .ppo import run_ppo
from .rm import run_rm
from .sft import run_sft


def run_exp(cfg: RunConfig, callbacks: list[TrainerCallback] | None = None) -> dict[str, Any]:
    """Run the stage named by `cfg.finetuning.stage` and return its metrics."""
    from transformers import set_seed

    # Seed before any model is built: head inits draw from the global RNG, and two runs that differ only
    # in an unused head must draw the same numbers.
    set_seed(cfg.training.seed)
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
    stage = cfg.finetuning.stage
    if stage == "sft":
        return run_sft(cfg, callbacks)
    if stage == "rm":
        return run_rm(cfg, callbacks)
    if stage == "dpo":
        return run_dpo(cfg, callbacks)
    if stage == "ppo":
        return run_ppo(cfg, callbacks)
    raise AssertionError(f"stage {stage!r} passed validation but has no workflow")
