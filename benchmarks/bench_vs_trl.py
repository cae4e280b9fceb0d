"""discoalign vs TRL 1.16, side by side: training throughput, peak memory and step-0 loss on the same work.

    python benchmarks/bench_vs_trl.py                    # compare: rm, dpo (live reference), dpo (precomputed)
    python benchmarks/bench_vs_trl.py --mode sweep       # ours: how time per step grows with length and batch
    python benchmarks/bench_vs_trl.py --quick            # a short run to check that everything works

What is compared (docs/performance.md explains the choices):
* One random-weight model, saved once and loaded by both sides: Qwen3 layout, hidden 256, 4 layers, 8k vocab by
  default (`--preset qwen-0.5b` for a ~0.5B model on a GPU). The DPO reference is a second random model.
* The same synthetic pairs at a fixed length: prompt `--prompt-len` tokens, chosen and rejected
  `--seq-len - --prompt-len` tokens each, random ids, EOS last. Same batch of `--batch` pairs, same precision
  (fp32 on CPU, bf16 autocast on GPU), same optimizer (each Trainer's default AdamW, lr 1e-5).
* One timed step = collate the rows + `trainer.training_step` (forward, loss, backward) + optimizer step, the
  same harness for both. Sides alternate A/B (the first side alternates too) over `--reps` repetitions of
  `--steps` steps, after `--warmup` steps each. Tokens/s counts the real tokens of the pairs as two padded
  sequences hold them, 2 x B x seq-len, for both sides alike.
* Peak memory: each side runs alone in a fresh child process (warm-up + 2 steps) and reports its peak resident
  set (CPU) or peak allocated GPU memory; in one process the allocator's high-water mark would be shared.
* Model-FLOPs utilisation of a step: (6 x params x tokens, plus 2 x params x tokens for a live reference forward)
  / step time / the matmul throughput measured here at start. `params` excludes the input embedding (a lookup),
  and for `rm` the LM head (a reward model has none). These are the FLOPs of the nominal work (every token of
  both sequences); packed pairs compute the shared prompt once, so ours can do the nominal work in fewer FLOPs.

Writes everything printed as JSON (`--json`, default benchmarks/results/bench_<mode>_<device>.json).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import torch  # noqa: E402

PAIRS = ("rm", "dpo", "dpo_precomputed")
SIDES = ("ours", "trl")
PRESETS = {
    # hidden, layers, heads, kv heads, head dim, intermediate, vocab
    "cpu-small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=64, intermediate_size=768, vocab_size=8192),
    # Qwen2.5-0.5B's shape in the Qwen3 layout: 494M parameters besides the input embedding
    "qwen-0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                      head_dim=64, intermediate_size=4864, vocab_size=151936),
}  # fmt: skip
LEARNING_RATE = 1e-5
BETA = 0.1
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


# ---- the shared model and data --------------------------------------------------------------------------


@dataclass
class Setup:
    """What both sides share: model directories, rows, and the run's shape."""

    policy_dir: str
    ref_dir: str
    device: str
    bf16: bool
    batch: int
    seq_len: int
    prompt_len: int
    pool: int  # distinct batches cycled through
    ours_keys: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_step(self) -> int:
        return 2 * self.batch * self.seq_len


def build_models(workdir: str, preset: str) -> tuple[str, str]:
    """Save a random policy (seed 0) and reference (seed 1) with our tiny tokenizer; return both directories."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    from discoalign.models.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    dirs = []
    for seed, name in ((0, "policy"), (1, "reference")):
        config = Qwen3Config(
            **PRESETS[preset],
            max_position_embeddings=4096,
            tie_word_embeddings=False,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
        out = os.path.join(workdir, name)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        dirs.append(out)
        del model
    return dirs[0], dirs[1]


def make_rows(setup: Setup, vocab_size: int, eos_id: int, seed: int = 0) -> list[list[dict[str, Any]]]:
    """`pool` batches of `batch` pairs: random ids (never a special token), fixed lengths, EOS last."""
    g = torch.Generator().manual_seed(seed)
    response_len = setup.seq_len - setup.prompt_len
    ids = lambda n: torch.randint(16, vocab_size, (n,), generator=g).tolist()  # noqa: E731
    batches = []
    for _ in range(setup.pool):
        batches.append(
            [
                {
                    "prompt_input_ids": ids(setup.prompt_len),
                    "chosen_input_ids": ids(response_len - 1) + [eos_id],
                    "rejected_input_ids": ids(response_len - 1) + [eos_id],
                    "margin": 0.0,
                }
                for _ in range(setup.batch)
            ]
        )
    return batches


@torch.no_grad()
def reference_logps(ref_dir: str, batches: list[list[dict[str, Any]]], device: str) -> None:
    """Add `ref_chosen_logps` / `ref_rejected_logps` to every row with a plain full-logits computation.

    Independent of both trainers, so the precomputed pair starts from the very same reference numbers.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32).to(device).eval()
    for rows in batches:
        for row in rows:
            for side in ("chosen", "rejected"):
                prompt, response = row["prompt_input_ids"], row[f"{side}_input_ids"]
                ids = torch.tensor([prompt + response], device=device)
                logp = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
                targets = ids[0, 1:]
                picked = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)[len(prompt) - 1 :]
                row[f"ref_{side}_logps"] = picked.sum().item()
    del model


def trl_rows(pair: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The same pairs in the columns TRL's collators read."""
    out = []
    for row in rows:
        prompt = row["prompt_input_ids"]
        if pair == "rm":
            chosen, rejected = prompt + row["chosen_input_ids"], prompt + row["rejected_input_ids"]
            out.append({"chosen_ids": chosen, "rejected_ids": rejected})
        else:
            r = {"prompt_ids": prompt, "chosen_ids": row["chosen_input_ids"], "rejected_ids": row["rejected_input_ids"]}
            if pair == "dpo_precomputed":
                r["ref_chosen_logps"] = row["ref_chosen_logps"]
                r["ref_rejected_logps"] = row["ref_rejected_logps"]
            out.append(r)
    return out


# ---- the two sides --------------------------------------------------------------------------------------


def _training_keys(setup: Setup, output_dir: str) -> dict[str, Any]:
    keys = {
        "output_dir": output_dir,
        "report_to": "none",
        "per_device_train_batch_size": setup.batch,
        "learning_rate": LEARNING_RATE,
        "bf16": setup.bf16,
        "use_cpu": setup.device == "cpu",
        "save_strategy": "no",
        "logging_strategy": "no",
        "disable_tqdm": True,
    }
    return keys


def build_ours(pair: str, setup: Setup, output_dir: str):
    """Our trainer for `pair`, with the speed switches in `setup.ours_keys`. Returns (trainer, collate)."""
    from discoalign.config import build_config
    from discoalign.data.collator import PairwiseCollator
    from discoalign.models.loader import load_model_with_heads

    raw = {
        "stage": "rm" if pair == "rm" else "dpo",
        "model_name_or_path": setup.policy_dir,
        "attn_implementation": "sdpa",
        "pref_beta": BETA,
        **_training_keys(setup, output_dir),
    }
    if pair == "dpo":
        raw["ref_model_name_or_path"] = setup.ref_dir
    if pair == "dpo_precomputed":
        raw["precompute_ref_logps"] = True
    raw.update(setup.ours_keys)
    cfg = build_config(raw)
    model, tokenizer = load_model_with_heads(cfg.model, cfg.finetuning, add_value_head=pair == "rm")
    collator = PairwiseCollator(tokenizer.pad_token_id)
    if pair == "rm":
        from discoalign.train.rm.trainer import RewardTrainer

        with torch.no_grad():
            model.value_head.summary.bias.zero_()  # TRL's score layer has no bias
        trainer = RewardTrainer(model, cfg, data_collator=collator, processing_class=tokenizer)
    else:
        from discoalign.train.dpo.trainer import DPOTrainer
        from discoalign.train.dpo.workflow import load_reference

        ref = load_reference(cfg, model) if pair == "dpo" else None
        trainer = DPOTrainer(model, cfg, ref_model=ref, data_collator=collator, processing_class=tokenizer)
    return trainer, trainer.data_collator


def build_trl(pair: str, setup: Setup, output_dir: str, value_weight: torch.Tensor | None):
    """TRL 1.16's trainer for `pair` on the same weights. Returns (trainer, collate)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(setup.policy_dir)
    keys = _training_keys(setup, output_dir)
    if pair == "rm":
        from trl import RewardConfig, RewardTrainer

        model = AutoModelForSequenceClassification.from_pretrained(
            setup.policy_dir, num_labels=1, attn_implementation="sdpa"
        )
        model.config.pad_token_id = tokenizer.pad_token_id
        if value_weight is not None:
            with torch.no_grad():
                model.score.weight.copy_(value_weight)
        args = RewardConfig(**keys, max_length=None)
        dummy = Dataset.from_dict({"chosen": ["a"], "rejected": ["b"]})
        trainer = RewardTrainer(model=model, args=args, processing_class=tokenizer, train_dataset=dummy)
    else:
        from trl import DPOConfig, DPOTrainer

        model = AutoModelForCausalLM.from_pretrained(setup.policy_dir, attn_implementation="sdpa")
        ref = None
        if pair == "dpo":
            ref = AutoModelForCausalLM.from_pretrained(setup.ref_dir, attn_implementation="sdpa")
        args = DPOConfig(**keys, beta=BETA, max_length=None, precompute_ref_log_probs=pair == "dpo_precomputed")
        dummy = Dataset.from_dict({"prompt": ["a"], "chosen": ["b"], "rejected": ["c"]})
        trainer = DPOTrainer(model=model, ref_model=ref, args=args, processing_class=tokenizer, train_dataset=dummy)
    return trainer, trainer.data_collator


class Runner:
    """One side of one pair: a trainer, its optimizer, and a step over the shared batches."""

    def __init__(self, side: str, pair: str, setup: Setup, batches, output_dir: str, value_weight=None) -> None:
        self.side = side
        if side == "ours":
            self.trainer, self.collate = build_ours(pair, setup, output_dir)
            self.rows = batches
        else:
            self.trainer, self.collate = build_trl(pair, setup, output_dir, value_weight)
            self.rows = [trl_rows(pair, rows) for rows in batches]
        # The same optimizer class and hyper-parameters on both sides: each Trainer's default (AdamW).
        self.optimizer = self.trainer.create_optimizer()
        self.trainer.current_gradient_accumulation_steps = 1  # set by `Trainer.train`, read by `training_step`
        self.device = setup.device
        self.count = 0

    def step(self) -> float:
        rows = self.rows[self.count % len(self.rows)]
        self.count += 1
        batch = self.collate([dict(r) for r in rows])
        loss = self.trainer.training_step(self.trainer.model, batch)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        value = loss.item()  # also a device sync
        return value

    def timed(self, steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        if self.device == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / steps

    def value_weight(self) -> torch.Tensor | None:
        head = getattr(self.trainer.model, "value_head", None)
        return head.summary.weight.detach().clone() if head is not None else None


def lm_head_params(model_dir: str) -> int:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    return config.vocab_size * config.hidden_size


def non_embedding_params(model_dir: str) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    return total - model.get_input_embeddings().weight.numel()


# ---- measurements ---------------------------------------------------------------------------------------


def matmul_flops(device: str, windows: int = 5, seconds: float = 0.4) -> float:
    """Matmul throughput (FLOP/s) of this machine in the precision the benchmark trains in: the best of a few
    short windows, so that another process briefly sharing the cores does not lower the reference."""
    n = 2048 if device == "cpu" else 8192
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = 0.0
    for _ in range(windows):
        runs, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            a @ b
            runs += 1
            if device == "cuda":
                torch.cuda.synchronize()
        best = max(best, 2 * n**3 * runs / (time.perf_counter() - start))
    return best


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def measure_memory(pair: str, side: str, setup: Setup, batches, workdir: str) -> dict[str, float]:
    """Peak memory of one side alone, from a fresh child process (see the module docstring)."""
    spec = os.path.join(workdir, f"setup_{pair}_{side}.json")
    with open(spec, "w") as f:
        json.dump({"setup": asdict(setup), "batches": batches}, f)
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", pair, side, spec]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"memory child {pair}/{side} failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1])


def memory_child(pair: str, side: str, spec: str) -> None:
    """Entry of the child process: build one side, run 3 steps, print its peak memory as JSON.

    Peak resident set is the kernel's high-water mark of this process (VmHWM; `ru_maxrss` would carry the
    parent's over the exec). Both sides import the same modules and hold the same rows, so the difference of
    their peaks is the difference of their trainers.
    """
    import trl  # noqa: F401  both sides import the same modules, so the baselines match

    with open(spec) as f:
        saved = json.load(f)
    setup, batches = Setup(**saved["setup"]), saved["batches"]
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    gc.collect()
    before = _proc_status_mib("VmRSS")
    if setup.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as out:
        runner = Runner(side, pair, setup, batches, out)
        after_setup = _proc_status_mib("VmRSS")
        for _ in range(3):
            runner.step()
    result = {"peak_rss_mib": _proc_status_mib("VmHWM"), "before_build_mib": before, "after_setup_mib": after_setup}
    if setup.device == "cuda":
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(result))


def _proc_status_mib(field_name: str) -> float:
    """A memory field of /proc/self/status (VmRSS: now, VmHWM: peak) in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def _vocab(model_dir: str) -> int:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir).vocab_size


def _eos(model_dir: str) -> int:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir).eos_token_id


# ---- the two modes --------------------------------------------------------------------------------------


def compare(args, setup: Setup, workdir: str, peak_flops: float) -> dict[str, Any]:
    """Ours vs TRL for each pair: tokens/s (median), ratio (min-max), peak memory, step-0 loss, MFU."""
    plain_batches = make_rows(setup, _vocab(setup.policy_dir), _eos(setup.policy_dir))
    params = non_embedding_params(setup.policy_dir)
    results: dict[str, Any] = {}
    for pair in args.pairs:
        print(f"\n== {pair}: building both sides", flush=True)
        batches = copy.deepcopy(plain_batches)  # only the precomputed pair's rows carry reference columns
        if pair == "dpo_precomputed":
            reference_logps(setup.ref_dir, batches, setup.device)
        ours = Runner("ours", pair, setup, batches, os.path.join(workdir, f"{pair}_ours"))
        trl = Runner("trl", pair, setup, batches, os.path.join(workdir, f"{pair}_trl"), ours.value_weight())
        step0 = {"ours": ours.step(), "trl": trl.step()}  # the first step of each is step 0 (then warm-up)
        for runner in (ours, trl):
            for _ in range(max(0, args.warmup - 1)):
                runner.step()
        times: dict[str, list[float]] = {"ours": [], "trl": []}
        for rep in range(args.reps):
            order = (ours, trl) if rep % 2 == 0 else (trl, ours)
            for runner in order:
                times[runner.side].append(runner.timed(args.steps))
            print(f"   rep {rep}: ours {times['ours'][-1]:.3f} s/step, trl {times['trl'][-1]:.3f} s/step", flush=True)
        del ours, trl
        gc.collect()
        tokens = setup.tokens_per_step
        # A reward model has no LM head (TRL's has a 1-wide score layer instead); DPO uses it.
        model_params = params - (lm_head_params(setup.policy_dir) if pair == "rm" else 0)
        flops = (6 + (2 if pair == "dpo" else 0)) * model_params * tokens
        ratios = [t / o for o, t in zip(times["ours"], times["trl"])]
        entry: dict[str, Any] = {
            "tokens_per_step": tokens,
            "model_params": model_params,
            "step_seconds": times,
            "step0_loss": step0,
            "ratio_median": statistics.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
        }
        for side in SIDES:
            median = statistics.median(times[side])
            entry[f"{side}_tokens_per_s"] = tokens / median
            entry[f"{side}_mfu"] = flops / median / peak_flops
        if not args.no_memory:
            for side in SIDES:
                print(f"   measuring peak memory of {side} in a child process", flush=True)
                entry[f"{side}_memory"] = measure_memory(pair, side, setup, batches, workdir)
        results[pair] = entry
    return results


def print_compare(results: dict[str, Any], device: str) -> None:
    mem_key = "peak_gpu_mib" if device == "cuda" else "peak_rss_mib"
    header = (f"{'pair':<16} {'ours tok/s':>10} {'TRL tok/s':>10} {'ours/TRL':>9} {'(min-max)':>13} "
              f"{'ours MiB':>9} {'TRL MiB':>9} {'ours loss0':>11} {'TRL loss0':>11} "
              f"{'ours MFU':>8} {'TRL MFU':>8}")  # fmt: skip
    print("\n" + header + "\n" + "-" * len(header))
    for pair, e in results.items():
        mem = {s: e.get(f"{s}_memory", {}).get(mem_key, float("nan")) for s in SIDES}
        print(
            f"{pair:<16} {e['ours_tokens_per_s']:>10.0f} {e['trl_tokens_per_s']:>10.0f} {e['ratio_median']:>8.2f}x "
            f"({e['ratio_min']:.2f}-{e['ratio_max']:.2f}) {mem['ours']:>9.0f} {mem['trl']:>9.0f} "
            f"{e['step0_loss']['ours']:>11.6f} {e['step0_loss']['trl']:>11.6f} {100 * e['ours_mfu']:>7.1f}% "
            f"{100 * e['trl_mfu']:>7.1f}%"
        )


def sweep(args, setup: Setup, workdir: str) -> dict[str, Any]:
    """Ours (and TRL with --with-trl): seconds per step for each sequence length and batch size."""
    results: dict[str, Any] = {}
    sides = SIDES if args.with_trl else ("ours",)
    for pair in [p for p in args.pairs if p != "dpo_precomputed"]:
        for seq_len in args.sweep_seq:
            for batch in args.sweep_batch:
                shape = Setup(**{**asdict(setup), "seq_len": seq_len, "prompt_len": seq_len // 2, "batch": batch})
                batches = make_rows(shape, _vocab(setup.policy_dir), _eos(setup.policy_dir))
                value_weight = None
                for side in sides:
                    runner = Runner(side, pair, shape, batches, os.path.join(workdir, f"sweep_{side}"), value_weight)
                    value_weight = runner.value_weight()
                    for _ in range(args.warmup):
                        runner.step()
                    seconds = statistics.median(runner.timed(args.steps) for _ in range(args.reps))
                    results.setdefault(pair, {}).setdefault(side, []).append(
                        {
                            "seq_len": seq_len,
                            "batch": batch,
                            "step_seconds": seconds,
                            "tokens_per_s": shape.tokens_per_step / seconds,
                        }  # fmt: skip
                    )
                    print(f"   {pair} {side} seq {seq_len} batch {batch}: {seconds:.3f} s/step", flush=True)
                    del runner
                    gc.collect()
    return results


def print_sweep(results: dict[str, Any]) -> None:
    for pair, by_side in results.items():
        for side, rows in by_side.items():
            print(f"\n{pair} ({side}): seconds per step; in brackets, growth over the previous sequence length")
            batches = sorted({r["batch"] for r in rows})
            print(f"{'seq_len':>8} " + " ".join(f"{'batch ' + str(b):>16}" for b in batches))
            lengths = sorted({r["seq_len"] for r in rows})
            table = {(r["seq_len"], r["batch"]): r["step_seconds"] for r in rows}
            for i, n in enumerate(lengths):
                cells = []
                for b in batches:
                    t = table[(n, b)]
                    growth = f"(x{t / table[(lengths[i - 1], b)]:.2f})" if i else ""
                    cells.append(f"{t:>8.3f} {growth:>7}")
                print(f"{n:>8} " + " ".join(cells))


# ---- entry point ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("compare", "sweep"), default="compare")
    p.add_argument("--pairs", default=",".join(PAIRS), help=f"comma-separated subset of {', '.join(PAIRS)}")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="default: cpu-small on CPU, qwen-0.5b on GPU")  # fmt: skip
    p.add_argument("--seq-len", type=int, default=None, help="prompt + response tokens (default 512 CPU, 1024 GPU)")
    p.add_argument("--prompt-len", type=int, default=None, help="default: half of --seq-len")
    p.add_argument("--batch", type=int, default=4, help="pairs per step")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--steps", type=int, default=2, help="steps per repetition")
    p.add_argument("--warmup", type=int, default=2, help="steps per side before timing (the first is step 0)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--ours", nargs="*", default=["pack_pairs=true"], help="our config keys (key=value)")
    p.add_argument("--no-memory", action="store_true", help="skip the child processes that measure peak memory")
    p.add_argument("--sweep-seq", type=int, nargs="+", default=[128, 256, 512, 1024])
    p.add_argument("--sweep-batch", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--with-trl", action="store_true", help="sweep: time TRL too")
    p.add_argument("--quick", action="store_true", help="seq 128, 2 reps of 1 step, no memory: a smoke run")
    p.add_argument("--json", default=None, help="output file (default benchmarks/results/bench_<mode>_<device>.json)")
    p.add_argument("--memory-child", nargs=3, metavar=("PAIR", "SIDE", "SPEC"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.pairs = [x for x in args.pairs.split(",") if x]
    unknown = [x for x in args.pairs if x not in PAIRS]
    if unknown:
        p.error(f"unknown pair(s) {unknown}; choose from {PAIRS}")
    if args.quick:
        args.seq_len, args.reps, args.steps, args.warmup, args.no_memory = 128, 2, 1, 1, True
        args.sweep_seq, args.sweep_batch = [64, 128], [1, 2]
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.memory_child:
        memory_child(*args.memory_child)
        return {}
    from discoalign.config.loader import parse_overrides

    torch.set_num_threads(args.threads)
    os.environ["BENCH_THREADS"] = str(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    preset = args.preset or ("qwen-0.5b" if device == "cuda" else "cpu-small")
    seq_len = args.seq_len or (1024 if device == "cuda" else 512)
    prompt_len = args.prompt_len or seq_len // 2
    if not 1 <= prompt_len <= seq_len - 2:
        raise SystemExit(f"--prompt-len must lie in [1, seq_len - 2]; got {prompt_len} for seq_len {seq_len}")

    import transformers
    import trl

    with tempfile.TemporaryDirectory(prefix="bench_vs_trl_") as workdir:
        policy_dir, ref_dir = build_models(workdir, preset)
        setup = Setup(policy_dir, ref_dir, device, device == "cuda", args.batch, seq_len, prompt_len, pool=2,
                      ours_keys=parse_overrides(args.ours))  # fmt: skip
        peak = matmul_flops(device)
        meta = {
            "command": " ".join(["python", "benchmarks/bench_vs_trl.py", *(argv or sys.argv[1:])]),
            "device": torch.cuda.get_device_name() if device == "cuda" else cpu_name(),
            "threads": args.threads, "preset": preset, "model": PRESETS[preset],
            "non_embedding_params": non_embedding_params(policy_dir), "seq_len": seq_len, "prompt_len": prompt_len,
            "batch": args.batch, "reps": args.reps, "steps": args.steps, "warmup": args.warmup,
            "precision": "bf16" if device == "cuda" else "fp32", "ours_keys": setup.ours_keys,
            "matmul_tflops": peak / 1e12, "load_average_start": load_average(),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__},
        }  # fmt: skip
        print(f"{meta['device']} ({device}, {args.threads} threads), matmul {peak / 1e9:.0f} GFLOP/s, "
              f"load average {meta['load_average_start']}; model {preset} "
              f"({meta['non_embedding_params'] / 1e6:.1f}M non-embedding params); seq {seq_len} "
              f"(prompt {prompt_len}), batch {args.batch} pairs; ours: {setup.ours_keys}", flush=True)  # fmt: skip
        if args.mode == "compare":
            results = compare(args, setup, workdir, peak)
            print_compare(results, device)
        else:
            results = sweep(args, setup, workdir)
            print_sweep(results)
    meta["load_average_end"] = load_average()
    print(f"\nload average at the end: {meta['load_average_end']}")
    out = {"meta": meta, "results": results}
    path = args.json or os.path.join(RESULTS_DIR, f"bench_{args.mode}_{device}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
