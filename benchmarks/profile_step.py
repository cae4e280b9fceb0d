"""Where one training step's time goes: `torch.profiler` over one step of one side of bench_vs_trl.py, top ops by
self CPU time (one thread by default, so other jobs' noise stays out of the split).

    python benchmarks/profile_step.py --pair dpo --finetuning full --seq-len 512            # ours
    python benchmarks/profile_step.py --pair dpo --finetuning full --seq-len 512 --side trl

Writes the table to benchmarks/results/profile_<side>_<pair>_<model>_<finetuning>_<seq>.txt (`--out` to change).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from bench_vs_trl import (  # noqa: E402
    MODEL_TAGS,
    PAIRS,
    PRESETS,
    RESULTS_DIR,
    Runner,
    Setup,
    _eos,
    build_models,
    make_rows,
    real_weights_available,
    reference_logps,
)
from torch.profiler import ProfilerActivity, profile  # noqa: E402


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pair", choices=PAIRS, default="dpo")
    p.add_argument("--side", choices=("ours", "trl"), default="ours")
    p.add_argument("--preset", choices=sorted(PRESETS), default="smollm2-135m")
    p.add_argument("--finetuning", choices=("lora", "full"), default="full")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--top", type=int, default=5)
    p.add_argument("--ours", nargs="*", default=["pack_pairs=true"])
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    from discoalign.config.loader import parse_overrides

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="profile_step_") as workdir:
        policy_dir, ref_dir = build_models(workdir, args.preset, real=real_weights_available(args.preset))
        setup = Setup(policy_dir, ref_dir, "cpu", False, args.batch, args.seq_len, args.seq_len // 2, pool=1,
                      ours_keys=parse_overrides(args.ours), finetuning=args.finetuning)  # fmt: skip
        batches = make_rows(setup, PRESETS[args.preset]["vocab_size"], _eos(policy_dir))
        if args.pair == "dpo_precomputed":
            reference_logps(policy_dir if args.finetuning == "lora" else ref_dir, batches, "cpu")
        runner = Runner(args.side, args.pair, setup, batches, os.path.join(workdir, "run"))
        runner.step()  # step 0: lazy set-up and the optimizer's state
        start = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            runner.step()
        seconds = time.perf_counter() - start
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=48)
    name = f"{args.side}_{args.pair}_{MODEL_TAGS[args.preset]}_{args.finetuning}_{args.seq_len}"
    text = (f"profile of one step: {name}, batch {args.batch} pairs, {args.threads} thread(s), "
            f"{seconds:.2f} s under the profiler, {time.strftime('%F %T')}\n"
            f"command: python benchmarks/profile_step.py {' '.join(argv if argv is not None else sys.argv[1:])}\n"
            f"{table}")  # fmt: skip
    print(text)
    out = args.out or os.path.join(RESULTS_DIR, f"profile_{name}.txt")
    with open(out, "w") as f:
        f.write(text)
    return text


if __name__ == "__main__":
    main()
