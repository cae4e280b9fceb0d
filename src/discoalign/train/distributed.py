"""What the trainers need to run the same YAML on N processes (DDP, DeepSpeed ZeRO-2/3): docs/distributed.md.

* `prepare_distributed`: before any model loads, join DeepSpeed's communication layer to the process group the
  Trainer set up (ZeRO-3 partitions weights while they load, and needs the world size then), and keep every
  rank but the first quiet, so logs and progress appear once.
* `zero_stage`, `gathered_parameters`, `prepare_reference`: ZeRO-3 keeps only a shard of each weight on a rank;
  these gather them for the one-off passes outside the training engine and shard the frozen DPO reference.
* `shard_bounds` / `gather_rows`: each rank computes a contiguous 1/N of a one-off pass (the precomputed
  reference log-probs) and every rank gets all rows back, in dataset order.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import socket
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_size() -> int:
    return torch.distributed.get_world_size() if _dist_ready() else 1


def rank() -> int:
    return torch.distributed.get_rank() if _dist_ready() else 0


def zero_stage(args: Any) -> int:
    """The DeepSpeed ZeRO stage the `TrainingArguments` ask for (`deepspeed: <json>`), 0 without DeepSpeed."""
    ds_config = getattr(args, "hf_deepspeed_config", None)
    if ds_config is None:
        return 0
    return int(ds_config.config.get("zero_optimization", {}).get("stage", 0) or 0)


def prepare_distributed(args: Any) -> None:
    """Run once per `run_exp`, before any model loads.

    Under DeepSpeed, make sure `deepspeed.comm` is initialised on the process group the Trainer's arguments
    created: with `use_cpu: true` accelerate sets up plain gloo, and ZeRO-3's `zero.Init` (used by transformers
    while a model loads) would otherwise see a world of one process and stop on its batch-size check
    ("train_batch_size is not equal to micro_batch_per_gpu * gradient_acc_step * world_size").
    On ranks other than 0, discoalign's, transformers' and datasets' logs drop to warnings.
    """
    args.device  # noqa: B018  (sets up the process group, as the Trainer would)
    if getattr(args, "deepspeed", None):
        import deepspeed

        if not _dist_ready():
            # One process started without a launcher (`discoalign train` with `deepspeed:` on one GPU, e.g. for
            # ZeRO offload): a world of one on this machine, instead of DeepSpeed's MPI discovery (mpi4py).
            for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                               ("MASTER_PORT", str(_free_port()))):  # fmt: skip
                os.environ.setdefault(key, value)
            backend = "nccl" if torch.cuda.is_available() and not getattr(args, "use_cpu", False) else "gloo"
            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
        elif not deepspeed.comm.is_initialized():
            deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(), auto_mpi_discovery=False)
    if args.process_index != 0:
        quiet_replica()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def quiet_replica() -> None:
    """Warnings and errors only, from this process: the main process (rank 0) prints the run's logs."""
    import datasets
    import transformers

    logging.getLogger("discoalign").setLevel(logging.WARNING)
    transformers.logging.set_verbosity_warning()
    datasets.logging.set_verbosity_error()


def is_zero3_partitioned(model: nn.Module) -> bool:
    """True when some parameter of `model` is a ZeRO-3 shard (an empty local tensor with a `ds_id`)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def gathered_parameters(model: nn.Module) -> contextlib.AbstractContextManager:
    """Context in which every ZeRO-3-sharded parameter of `model` is whole on this rank (read only); a no-op
    for unsharded models. For the one-off passes outside the training engine (precomputing the reference),
    which have no per-layer gathering hooks yet."""
    if not is_zero3_partitioned(model):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)


def prepare_reference(accelerator: Any, ref_model: nn.Module) -> nn.Module:
    """Prepare the frozen DPO reference for inference.

    DDP / single process: accelerate's evaluation-mode preparation (device placement, no wrapper). DeepSpeed:
    as TRL prepares it, an inference engine (no optimizer) with the run's config; under ZeRO-3 the reference
    stays sharded like the policy and each layer's weights are gathered as it runs, under ZeRO-1/2 (which
    shard optimizer state only) it is a plain stage-0 engine.
    """
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return accelerator.prepare_model(ref_model, evaluation_mode=True)
    import deepspeed

    config = copy.deepcopy(plugin.deepspeed_config)
    zero = config.setdefault("zero_optimization", {})
    stage = int(zero.get("stage", 0) or 0)
    hidden = getattr(ref_model.config.get_text_config(), "hidden_size", None)
    if stage == 3 and hidden:
        # The Trainer fills these "auto" values only for the model it trains (the same formulas).
        zero.update(reduce_bucket_size=hidden * hidden, stage3_param_persistence_threshold=10 * hidden,
                    stage3_prefetch_bucket_size=int(0.9 * hidden * hidden))  # fmt: skip
    if stage != 3:
        config["zero_optimization"] = {"stage": 0}
    for key in ("optimizer", "scheduler"):
        config.pop(key, None)
    for key, value in list(config.items()):
        if value == "auto":  # e.g. gradient_clipping: meaningless without an optimizer
            config.pop(key)
    for section in ("fp16", "bf16"):
        if isinstance(config.get(section), dict) and config[section].get("enabled") == "auto":
            config[section]["enabled"] = False
    engine, *_ = deepspeed.initialize(model=ref_model, config=config)
    engine.eval()
    return engine


def shard_bounds(length: int, num_shards: int, index: int) -> tuple[int, int]:
    """[start, end) of shard `index` of `length` rows cut into `num_shards` contiguous pieces (sizes differ by
    at most one row; the first `length % num_shards` shards hold the extra row)."""
    base, extra = divmod(length, num_shards)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


def gather_rows(local: torch.Tensor, length: int) -> torch.Tensor:
    """All ranks' (n_r, ...) contiguous shards (`shard_bounds`) -> the (length, ...) whole, on every rank.

    Shards are padded to one size for `all_gather`, then trimmed; a single process returns `local` itself.
    """
    world = world_size()
    if world == 1:
        return local
    largest = shard_bounds(length, world, 0)[1]
    padded = local.new_zeros((largest, *local.shape[1:]))
    padded[: local.shape[0]] = local
    device = _collective_device(local)
    parts = [torch.empty_like(padded, device=device) for _ in range(world)]
    torch.distributed.all_gather(parts, padded.to(device))
    pieces = []
    for r, part in enumerate(parts):
        start, end = shard_bounds(length, world, r)
        pieces.append(part[: end - start].to(local.device))
    return torch.cat(pieces)


def _collective_device(tensor: torch.Tensor) -> torch.device:
    """NCCL moves CUDA tensors only; gloo CPU ones."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return tensor.device


def keep_lm_head_whole(model: nn.Module) -> int:
    """Under ZeRO-3, keep a *frozen* LM head gathered through each training step (LoRA's).

    The response log-probs are computed a chunk at a time and each chunk is recomputed in the backward pass
    (`losses.logps`, activation checkpointing around the LM head). ZeRO-3 releases a layer's gathered weight after
    its forward; for a trainable LM head its backward hooks gather it again before the recomputation, but a frozen
    one gets no such hook, and the recomputation meets the empty shard ("Recomputed values ... have different
    metadata": shape [V, H] saved, [0] recomputed). Flagged as an external parameter, the weight is gathered at
    its first use and not released until the engine resets the step; frozen, it never goes stale. Costs one
    whole LM head (V x H) per rank during the step. Returns the number of parameters flagged. Call once the
    DeepSpeed engine exists (it sets the flag when it converts parameters).
    """
    lm_head = getattr(model, "lm_head", None)
    if lm_head is None:
        return 0
    marked = 0
    for param in lm_head.parameters():
        if hasattr(param, "ds_id") and not param.requires_grad:
            param.is_external_param = True
            marked += 1
    return marked


def shutdown_process_group() -> None:
    """At the end of a multi-process run: wait for every rank, then destroy the process group. Left to interpreter
    exit, the gloo backend's threads can be torn down while still joinable, and a rank aborts (SIGABRT, "terminate
    called without an active exception") after its work is done, failing the whole `torchrun`."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
