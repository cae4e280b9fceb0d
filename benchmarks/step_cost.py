"""What one training step costs, in measures that other jobs on the machine do not move: process CPU time per step
(one thread), FLOPs (`torch.utils.flop_counter`), aten ops dispatched, and the largest tensor allocated.

    PYTHONPATH=src python benchmarks/step_cost.py --pairs dpo,dpo_precomputed,rm --sides ours,trl
    PYTHONPATH=src python benchmarks/step_cost.py --preset smollm2-135m --seq-len 256 --batch 2 --pairs dpo,rm --mfu

`--mfu`: the model-FLOPs utilisation of the step. The FLOPs are counted (`FlopCounterMode`: matmuls and attention of
forward and backward, the reference forward included; the optimizer's element-wise work counts none) and divided by
the one-thread CPU time of the forward/backward (`training_step`) alone and of the whole step (with the optimizer),
then by the one-thread fp32 matmul throughput measured in the same process before and after the steps (the best
of the two: another job sharing the cores lowers it).

Wall time on a shared 2-core machine swings 2-3x with the load; the CPU time of a one-thread process barely does
(it still counts cache and memory-bandwidth contention, so run interleaved comparisons). The models and rows come
from bench_vs_trl.py (same presets, same seeds), and only `discoalign`'s public trainer API is used, so the same
script measures another checkout's code: `PYTHONPATH=/tmp/old/src python benchmarks/step_cost.py ...` (the
regression check of docs/performance.md). Prints one JSON line per (pair, side), and writes them with `--json`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from bench_vs_trl import (  # noqa: E402
    PAIRS,
    PRESETS,
    Runner,
    Setup,
    build_models,
    make_rows,
    matmul_flops,
    reference_logps,
)
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402


class OpCount(TorchDispatchMode):
    """aten ops dispatched and the largest new storage any of them returned."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.largest = 0
        self.by_name: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        name = str(func)
        self.by_name[name] = self.by_name.get(name, 0) + 1
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


def cpu_step(runner: Runner) -> tuple[float, float]:
    """(process CPU seconds, wall seconds) of one step."""
    cpu, wall = time.process_time(), time.perf_counter()
    runner.step()
    return time.process_time() - cpu, time.perf_counter() - wall


def split_step(runner: Runner) -> tuple[float, float]:
    """(CPU seconds of collate + forward/backward, CPU seconds of the optimizer step) of one step."""
    rows = runner.rows[runner.count % len(runner.rows)]
    runner.count += 1
    start = time.process_time()
    batch = runner.collate([dict(r) for r in rows])
    loss = runner.trainer.training_step(runner.trainer.model, batch)
    loss.item()
    middle = time.process_time()
    runner.optimizer.step()
    runner.optimizer.zero_grad(set_to_none=True)
    return middle - start, time.process_time() - middle


def git_commit(src: str) -> str:
    try:
        out = subprocess.run(["git", "-C", src, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        return out.stdout.strip()
    except OSError:
        return ""


def measure(pair: str, side: str, setup: Setup, batches, workdir: str, args) -> dict:
    runner = Runner(side, pair, setup, batches, os.path.join(workdir, f"{pair}_{side}"))
    for _ in range(args.warmup):
        runner.step()
    samples = [cpu_step(runner) for _ in range(args.steps)]
    flops = FlopCounterMode(display=False)
    with flops:
        runner.step()
    ops = OpCount()
    with ops:
        runner.step()
    cpu = [c for c, _ in samples]
    extra = mfu(runner, flops.get_total_flops(), statistics.median(cpu), args) if args.mfu else {}
    return {
        "pair": pair,
        "side": side,
        "cpu_s_median": statistics.median(cpu),
        "cpu_s": [round(c, 4) for c in cpu],
        "wall_s": [round(w, 4) for _, w in samples],
        "gflops": flops.get_total_flops() / 1e9,
        "aten_ops": ops.ops,
        "largest_alloc_mib": ops.largest / 2**20,
        **({"op_counts": ops.by_name} if args.op_counts else {}),
        **extra,
    }


def mfu(runner: Runner, flops: float, step_cpu: float, args) -> dict:
    """Counted FLOPs per CPU second of the forward/backward and of the whole step, against the matmul peak."""
    split = [split_step(runner) for _ in range(args.steps)]
    fwd_bwd = statistics.median(f for f, _ in split)
    after = matmul_flops("cpu", clock=time.process_time)
    peak = max(args.peak_flops, after)
    return {
        "matmul_gflops_per_cpu_s": [round(args.peak_flops / 1e9, 1), round(after / 1e9, 1)],  # before, after
        "fwd_bwd_cpu_s": [round(f, 4) for f, _ in split],
        "optimizer_cpu_s": [round(o, 4) for _, o in split],
        "gflops_per_cpu_s_fwd_bwd": flops / fwd_bwd / 1e9,
        "mfu_fwd_bwd": flops / fwd_bwd / peak,
        "mfu_step": flops / step_cpu / peak,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", default="dpo,dpo_precomputed,rm")
    p.add_argument("--sides", default="ours")
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--ours", nargs="*", default=["pack_pairs=true"], help="our config keys (key=value)")
    p.add_argument("--json", default=None, help="append the JSON lines to this file")
    p.add_argument("--op-counts", action="store_true", help="also list how often each aten op ran")
    p.add_argument("--finetuning", choices=("lora", "full"), default="full")
    p.add_argument("--mfu", action="store_true", help="also the MFU against a matmul peak measured here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    args.peak_flops = matmul_flops("cpu", clock=time.process_time) if args.mfu else 0.0
    import discoalign
    from discoalign.config.loader import parse_overrides

    src = os.path.dirname(os.path.dirname(os.path.abspath(discoalign.__file__)))
    meta = {"src": src, "commit": git_commit(src), "preset": args.preset, "seq_len": args.seq_len,
            "batch": args.batch, "finetuning": args.finetuning, "threads": 1, "date": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
    rows_out = []
    with tempfile.TemporaryDirectory(prefix="step_cost_") as workdir:
        policy_dir, ref_dir = build_models(workdir, args.preset)
        setup = Setup(policy_dir, ref_dir, "cpu", False, args.batch, args.seq_len, args.seq_len // 2, pool=2,
                      ours_keys=parse_overrides(args.ours), finetuning=args.finetuning)  # fmt: skip
        vocab = PRESETS[args.preset]["vocab_size"]
        from transformers import AutoTokenizer

        plain = make_rows(setup, vocab, AutoTokenizer.from_pretrained(policy_dir).eos_token_id)
        for pair in [x for x in args.pairs.split(",") if x]:
            if pair not in PAIRS:
                raise SystemExit(f"unknown pair {pair}; choose from {PAIRS}")
            batches = json.loads(json.dumps(plain))
            if pair == "dpo_precomputed":
                reference_logps(policy_dir if args.finetuning == "lora" else ref_dir, batches, "cpu")
            for side in args.sides.split(","):
                row = {**meta, **measure(pair, side, setup, batches, workdir, args)}
                print(json.dumps(row), flush=True)
                rows_out.append(row)
    if args.json:
        with open(args.json, "a") as f:
            for row in rows_out:
                f.write(json.dumps(row) + "\n")
    return rows_out


if __name__ == "__main__":
    main()
