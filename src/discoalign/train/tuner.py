"""`run_exp`: dispatch a resolved config to its stage's workflow (LlamaFactory's `tuner.run_exp`)."""

from __future__ import annotations

import logging
from typing import Any

from transformers import TrainerCallback

from ..config.compat import KeyNote, notice
from ..config.finetuning_groups import ONLINE_STAGES
from ..config.loader import RunConfig
from ..config.output_dir import check_resume, prepare_output_dir
from .distributed import prepare_distributed
from .dpo.workflow import DPOWorkflow
from .grpo.workflow import GRPOWorkflow
from .kto.workflow import KTOWorkflow
from .ppo.workflow import PPOWorkflow
from .rm.workflow import RMWorkflow
from .sft.workflow import SFTWorkflow
from .workflow import StageWorkflow

logger = logging.getLogger(__name__)

WORKFLOWS: dict[str, type[StageWorkflow]] = {
    "sft": SFTWorkflow,
    "rm": RMWorkflow,
    "dpo": DPOWorkflow,
    "ppo": PPOWorkflow,
    "kto": KTOWorkflow,
    "grpo": GRPOWorkflow,
}


def run_exp(cfg: RunConfig, callbacks: list[TrainerCallback] | None = None) -> dict[str, Any]:
    """Run the stage named by `cfg.finetuning.stage` and return its metrics."""
    args = cfg.training
    limit_cutoff_len(cfg)
    if args.process_index == 0 and (text := notice(cfg.key_notes, cfg.source)):
        logger.warning(text)
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


def limit_cutoff_len(cfg: RunConfig) -> None:
    """Clamp `cutoff_len` to the model's positions (read from its config before any weight loads), with a note; for
    PPO, whose sequences are a prompt (< `cutoff_len` tokens) and up to `max_new_tokens` sampled ones, the two
    together (halves of the limit when both are too long).

    Clamped rather than refused: a config written for a longer model (LlamaFactory's examples use 2048) then runs,
    and every sequence stays inside what the model can read; see `models.positions`.
    """
    from ..models.positions import position_limit

    limit = position_limit(cfg.model.model_name_or_path, cfg.model.cache_dir)
    if limit is None:
        return
    positions, field = limit
    why = (f"the model reads at most {positions} positions (`{field}` in its config); longer sequences would fail "
           "(learned positions) or run on positions it never saw (RoPE)")  # fmt: skip
    ft, data = cfg.finetuning, cfg.data
    new = {"cutoff_len": min(data.cutoff_len, positions)}
    if ft.stage in ONLINE_STAGES and data.cutoff_len + ft.max_new_tokens > positions:
        new["cutoff_len"] = min(data.cutoff_len, max(positions - ft.max_new_tokens, positions // 2))
        new["max_new_tokens"] = min(ft.max_new_tokens, positions - new["cutoff_len"])
        why += ", and a PPO sequence is the prompt and the sampled response together"
    for key, value in new.items():
        owner = data if key == "cutoff_len" else ft
        if value != getattr(owner, key):
            cfg.key_notes.append(KeyNote(key, getattr(owner, key), f"`{key}: {value}`", why))
            setattr(owner, key, value)
            cfg.resolved[key] = value
