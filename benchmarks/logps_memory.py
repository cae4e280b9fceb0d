"""The DPO log-prob computation alone at a real vocabulary: time and peak memory of forward + backward, per method.

    python benchmarks/logps_memory.py                      # SmolLM2-135M's head: H 576, V 49,152
    python benchmarks/logps_memory.py --pairs 2 --seq 512

Methods, each in a fresh child process (peak resident set, VmHWM, minus the set after its inputs exist; on a GPU
the peak allocated CUDA memory minus what the inputs hold):
* `full_all_positions`: the plain path (`logps_chunk_size: 0`, and a naive implementation): every position (prompt
  and padding too) through the LM head, one fp32 `(2B, T, V)` logits tensor and its log-softmax, then gather;
* `full_response_only`: the same full log-softmax over the response positions only;
* `chunked_checkpoint`: `losses.logps.sequence_logps` for a wrapped head: response positions only, `--chunk` at
  a time, each chunk recomputed in backward by `torch.utils.checkpoint`;
* `fused`: `losses.fused_logps.FusedLinearLogps` (no autograd graph over the logits; in-place gradient), what
  `sequence_logps` runs for a plain `nn.Linear` head on one process.
Writes benchmarks/results/logps_memory_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

METHODS = ("full_all_positions", "full_response_only", "chunked_checkpoint", "fused")
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "logps_memory_cpu.json")


def _rss(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def child(method: str, args) -> dict:
    torch.set_num_threads(args.threads)
    run(method, args, pairs=1, seq=8)  # one-time costs (lazy imports, first-call set-up) stay out of the numbers
    return run(method, args, args.pairs, args.seq)


def run(method: str, args, pairs: int, seq: int) -> dict:
    from discoalign.losses.fused_logps import fused_token_logps
    from discoalign.losses.logps import sequence_logps

    g = torch.Generator().manual_seed(0)
    rows, response = 2 * pairs, seq // 2
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    head = torch.nn.Linear(args.hidden, args.vocab, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=g) * args.hidden**-0.5)
    head = head.to(device)
    hidden = torch.randn(rows, seq, args.hidden, generator=g).to(device).requires_grad_(True)
    labels = torch.randint(0, args.vocab, (rows, seq), generator=g).to(device)
    labels[:, : seq - response] = -100
    upstream = torch.randn(rows, generator=g).to(device)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() / 2**20 if cuda else _rss("VmRSS")
    start = time.perf_counter()
    if method == "full_all_positions":
        logits = head(hidden[:, :-1]).float()
        mask = labels[:, 1:] != -100
        picked = logits.log_softmax(-1).gather(-1, labels[:, 1:].clamp(min=0)[..., None]).squeeze(-1)
        out = (picked * mask).sum(-1)
    elif method == "full_response_only":
        mask = labels[:, 1:] != -100
        logits = head(hidden[:, :-1][mask]).float()
        picked = logits.log_softmax(-1).gather(-1, labels[:, 1:][mask][:, None]).squeeze(-1)
        out = torch.zeros(rows, device=device).index_add(0, mask.nonzero(as_tuple=True)[0], picked)
    elif method == "chunked_checkpoint":
        # A wrapped head takes sequence_logps' checkpointed path (a bare nn.Linear takes the fused one).
        out = sequence_logps(hidden, torch.nn.Sequential(head), labels, args.chunk)
    else:
        mask = labels[:, 1:] != -100
        picked = fused_token_logps(hidden[:, :-1][mask], head.weight, labels[:, 1:][mask], args.chunk)
        out = torch.zeros(rows, device=device).index_add(0, mask.nonzero(as_tuple=True)[0], picked)
    (out * upstream).sum().backward()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else _rss("VmHWM")
    return {
        "method": method,
        "seconds": seconds,
        "peak_extra_mib": peak - before,
        "value": out.sum().item(),
        "grad_hidden_norm": hidden.grad.norm().item(),
        "grad_weight_norm": head.weight.grad.norm().item(),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--seq", type=int, default=512, help="prompt + response tokens; the response is half")
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2, help="child processes per method (the fastest is kept)")
    p.add_argument("--json", default=RESULTS)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args)))
        return
    rows = []
    keys = ("pairs", "seq", "hidden", "vocab", "chunk", "threads")
    forwarded = [x for k in keys for x in (f"--{k}", str(getattr(args, k)))]
    for method in METHODS:
        runs = []
        for _ in range(args.repeats):
            cmd = [sys.executable, os.path.abspath(__file__), *forwarded, "--child", method]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        best = min(runs, key=lambda r: r["seconds"])
        best["seconds_all"] = [round(r["seconds"], 3) for r in runs]
        best["peak_extra_mib"] = max(r["peak_extra_mib"] for r in runs)
        rows.append(best)
        print(f"{method:<20} {best['seconds']:7.3f} s  peak +{best['peak_extra_mib']:7.0f} MiB  "
              f"value {best['value']:.4f}  |grad h| {best['grad_hidden_norm']:.6f}  "
              f"|grad W| {best['grad_weight_norm']:.6f}", flush=True)  # fmt: skip
    meta = {"command": "python benchmarks/logps_memory.py " + " ".join(forwarded), "date": time.strftime("%F %T"),
            "torch": torch.__version__, **{k: v for k, v in vars(args).items() if k not in ("child", "json")}}  # fmt: skip
    with open(args.json, "w") as f:
        json.dump({"meta": meta, "results": rows}, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
