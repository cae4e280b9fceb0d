"""discoalign vs TRL 1.16, side by side: training throughput, peak memory and step-0 loss on the same work.

    python benchmarks/bench_vs_trl.py                    # real shapes (make bench): SmolLM2-135M, rm / dpo /
                                                         #   dpo_precomputed x lora / full x cutoff 256 / 512
    python benchmarks/bench_vs_trl.py --tiny             # the 5.2M-parameter model of earlier sessions
    python benchmarks/bench_vs_trl.py --quick            # --tiny, short: the ratios in about a minute (make bench-quick)
    python benchmarks/bench_vs_trl.py --mode sweep --tiny  # ours: how time per step grows with length and batch

What is compared (docs/performance.md explains the choices):
* One model, saved once and loaded by both sides (bench_shapes.py): by default SmolLM2-135M-Instruct's shape (the
  real weights when pulled, else random), `--tiny` a random Qwen3-layout model with 8k vocab. The DPO reference of
  full fine-tuning is a second model (the same real weights, or a second random model); with LoRA it is the base
  model with the adapters off, on both sides. LoRA: rank 8, alpha 16, every linear layer but the LM head.
* The same synthetic pairs at a fixed length: prompt half the sequence (`--prompt-len`), chosen and rejected the
  rest each, random ids, EOS last. Same batch of `--batch` pairs, same precision (fp32 on CPU, bf16 autocast on
  GPU), same optimizer (each Trainer's default AdamW, lr 1e-5).
* One timed step = collate the rows + `trainer.training_step` (forward, loss, backward) + optimizer step, the
  same harness for both. Sides alternate A/B (the first side alternates too) over `--reps` repetitions of
  `--steps` steps, after `--warmup` steps each. Tokens/s counts the real tokens of the pairs as two padded
  sequences hold them, 2 x B x seq-len, for both sides alike. The ratio of process CPU times is printed too: it
  moves less than wall time when other jobs share the cores.
* Peak memory: each side runs alone in a fresh child process (2 steps: the second runs with the optimizer's
  state allocated) and reports its peak resident
  set (CPU) or peak allocated GPU memory; in one process the allocator's high-water mark would be shared.
* Model-FLOPs utilisation of a step: the nominal FLOPs (6 x params x tokens for full fine-tuning, 4 x for LoRA,
  plus 2 x params x tokens for a live reference forward) / step time / the matmul throughput measured here at
  start. `params` excludes the input embedding (a lookup), and for `rm` the LM head (a reward model has none).
  Packed pairs compute the shared prompt once and our DPO projects only response tokens through the LM head, so
  ours does the nominal work with fewer FLOPs and its "MFU" can pass 100%.

Writes everything printed as JSON (`--json`, default benchmarks/results/bench_<mode>_<device>_<model>.json).
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_shapes import (  # noqa: E402
    MODEL_TAGS,
    PRESETS,
    build_models,
    param_counts,
    real_weights_available,
    trl_lora_config,
)

PAIRS = ("rm", "dpo", "dpo_precomputed")
SIDES = ("ours", "trl")
FINETUNING = ("lora", "full")
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
    finetuning: str = "full"  # or "lora" (rank 8, every linear layer but the LM head, on both sides)

    @property
    def tokens_per_step(self) -> int:
        return 2 * self.batch * self.seq_len


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
    if setup.finetuning == "lora":
        raw["finetuning_type"] = "lora"  # the reference is the base model with the adapters off
    elif pair == "dpo":
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
    peft = trl_lora_config(pair) if setup.finetuning == "lora" else None
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
        trainer = RewardTrainer(
            model=model, args=args, processing_class=tokenizer, train_dataset=dummy, peft_config=peft
        )
    else:
        from trl import DPOConfig, DPOTrainer

        model = AutoModelForCausalLM.from_pretrained(setup.policy_dir, attn_implementation="sdpa")
        ref = None
        if pair == "dpo" and peft is None:
            ref = AutoModelForCausalLM.from_pretrained(setup.ref_dir, attn_implementation="sdpa")
        args = DPOConfig(**keys, beta=BETA, max_length=None, precompute_ref_log_probs=pair == "dpo_precomputed")
        dummy = Dataset.from_dict({"prompt": ["a"], "chosen": ["b"], "rejected": ["c"]})
        trainer = DPOTrainer(
            model=model, ref_model=ref, args=args, processing_class=tokenizer, train_dataset=dummy, peft_config=peft
        )
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

    def timed(self, steps: int) -> tuple[float, float]:
        """(wall seconds, process CPU seconds) per step over `steps` steps. CPU time moves much less than wall time
        when other jobs share the cores (docs/performance.md, Noise)."""
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            self.step()
        if self.device == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / steps, (time.process_time() - cpu) / steps

    def value_weight(self) -> torch.Tensor | None:
        head = getattr(self.trainer.model, "value_head", None)
        return head.summary.weight.detach().clone() if head is not None else None


# ---- measurements ---------------------------------------------------------------------------------------


def matmul_flops(device: str, windows: int = 5, seconds: float = 0.4, clock=time.perf_counter) -> float:
    """Matmul throughput (FLOP/s) of this machine in the precision the benchmark trains in: the best of a few
    short windows, so that another process briefly sharing the cores does not lower the reference. `clock`:
    `time.process_time` measures it per CPU second (one thread), as step_cost.py measures steps."""
    n = 2048 if device == "cpu" else 8192
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = 0.0
    for _ in range(windows):
        runs, start = 0, clock()
        while clock() - start < seconds:
            a @ b
            runs += 1
            if device == "cuda":
                torch.cuda.synchronize()
        best = max(best, 2 * n**3 * runs / (clock() - start))
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
    """Entry of the child process: build one side, run 2 steps, print its peak memory as JSON.

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
        for _ in range(2):
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


def nominal_flops(pair: str, setup: Setup, params: dict[str, int]) -> float:
    """FLOPs of the nominal work of one step (every token of both sequences; see the module docstring): forward 2,
    backward 4 per parameter and token (2 with LoRA: no weight gradients for frozen weights), a live reference
    forward 2 more. A reward model has no LM head."""
    n = params["body"] + (0 if pair == "rm" else params["lm_head"])
    per_token = (6 if setup.finetuning == "full" else 4) + (2 if pair == "dpo" else 0)
    return per_token * n * setup.tokens_per_step


def compare_case(args, pair: str, setup: Setup, plain_batches, workdir: str) -> dict[str, Any]:
    """Ours vs TRL on one (pair, shape): step times, ratios, step-0 losses, peak memory."""
    batches = copy.deepcopy(plain_batches)  # only the precomputed pair's rows carry reference columns
    if pair == "dpo_precomputed":
        # The reference of a LoRA run is the base model (the policy's weights), else the reference model.
        reference_logps(setup.policy_dir if setup.finetuning == "lora" else setup.ref_dir, batches, setup.device)
    if args.memory_only:
        os.makedirs(workdir, exist_ok=True)
        entry = {"pair": pair, "finetuning": setup.finetuning, "seq_len": setup.seq_len}
        return {**entry, **{f"{side}_memory": measure_memory(pair, side, setup, batches, workdir) for side in SIDES}}
    ours = Runner("ours", pair, setup, batches, os.path.join(workdir, "ours"))
    trl = Runner("trl", pair, setup, batches, os.path.join(workdir, "trl"), ours.value_weight())
    step0 = {"ours": ours.step(), "trl": trl.step()}  # the first step of each is step 0 (then warm-up)
    for runner in (ours, trl):
        for _ in range(max(0, args.warmup - 1)):
            runner.step()
    times: dict[str, list[float]] = {"ours": [], "trl": []}
    cpu: dict[str, list[float]] = {"ours": [], "trl": []}
    for rep in range(args.reps):
        order = (ours, trl) if rep % 2 == 0 else (trl, ours)
        for runner in order:
            wall, cpu_s = runner.timed(args.steps)
            times[runner.side].append(wall)
            cpu[runner.side].append(cpu_s)
        print(f"   rep {rep}: ours {times['ours'][-1]:.3f} s/step, trl {times['trl'][-1]:.3f} s/step "
              f"(CPU {cpu['ours'][-1]:.2f} / {cpu['trl'][-1]:.2f} s)", flush=True)  # fmt: skip
    del ours, trl
    gc.collect()
    ratios = [t / o for o, t in zip(times["ours"], times["trl"])]
    cpu_ratios = [t / o for o, t in zip(cpu["ours"], cpu["trl"])]
    entry: dict[str, Any] = {
        "pair": pair,
        "finetuning": setup.finetuning,
        "seq_len": setup.seq_len,
        "tokens_per_step": setup.tokens_per_step,
        "step_seconds": times,
        "step_cpu_seconds": cpu,
        "step0_loss": step0,
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "cpu_ratio_median": statistics.median(cpu_ratios),
    }
    if not args.no_memory and (not args.memory_at or setup.seq_len in args.memory_at):
        for side in SIDES:
            print(f"   measuring peak memory of {side} in a child process", flush=True)
            entry[f"{side}_memory"] = measure_memory(pair, side, setup, batches, workdir)
    return entry


def compare(args, cases: list[tuple[str, str, Setup]], workdir: str, peak_flops: float, save=None) -> dict[str, Any]:
    """Ours vs TRL for each case (name, pair, shape): tokens/s, ratio (median, min-max), peak memory, step-0
    loss, MFU."""
    results: dict[str, Any] = {}
    params = param_counts(cases[0][2].policy_dir)
    rows: dict[tuple[int, int], Any] = {}
    for name, pair, setup in cases:
        print(f"\n== {name}: building both sides", flush=True)
        key = (setup.seq_len, setup.batch)
        if key not in rows:
            rows[key] = make_rows(setup, _vocab(setup.policy_dir), _eos(setup.policy_dir))
        entry = compare_case(args, pair, setup, rows[key], os.path.join(workdir, name))
        results[name] = entry
        flops = nominal_flops(pair, setup, params)
        entry["model_params"] = params
        entry["nominal_flops"] = flops
        for side in SIDES if "step_seconds" in entry else ():  # not with --memory-only
            median = statistics.median(entry["step_seconds"][side])
            entry[f"{side}_tokens_per_s"] = setup.tokens_per_step / median
            entry[f"{side}_mfu"] = flops / median / peak_flops
        if save is not None:
            save(results)  # a long run keeps what it measured so far
    return results


def print_compare(results: dict[str, Any], device: str) -> None:
    mem_key = "peak_gpu_mib" if device == "cuda" else "peak_rss_mib"
    width = max(16, *(len(name) for name in results))
    header = (f"{'case':<{width}} {'ours tok/s':>10} {'TRL tok/s':>10} {'ours/TRL':>9} {'(min-max)':>13} {'CPU-time':>8} "
              f"{'ours MiB':>9} {'TRL MiB':>9} {'ours loss0':>11} {'TRL loss0':>11} "
              f"{'ours MFU':>8} {'TRL MFU':>8}")  # fmt: skip
    print("\n" + header + "\n" + "-" * len(header))
    for name, e in results.items():
        mem = {s: e.get(f"{s}_memory", {}).get(mem_key, float("nan")) for s in SIDES}
        if "step_seconds" not in e:  # --memory-only
            print(f"{name:<{width}} peak memory ours {mem['ours']:.0f} MiB, TRL {mem['trl']:.0f} MiB")
            continue
        print(
            f"{name:<{width}} {e['ours_tokens_per_s']:>10.0f} {e['trl_tokens_per_s']:>10.0f} "
            f"{e['ratio_median']:>8.2f}x ({e['ratio_min']:.2f}-{e['ratio_max']:.2f}) {e['cpu_ratio_median']:>7.2f}x "
            f"{mem['ours']:>9.0f} {mem['trl']:>9.0f} {e['step0_loss']['ours']:>11.6f} {e['step0_loss']['trl']:>11.6f} "
            f"{100 * e['ours_mfu']:>7.1f}% {100 * e['trl_mfu']:>7.1f}%"
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
                    seconds = statistics.median(runner.timed(args.steps)[0] for _ in range(args.reps))
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
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: smollm2-135m")
    p.add_argument("--tiny", action="store_true", help="the 5.2M-parameter cpu-small model of earlier sessions")
    p.add_argument("--random-weights", action="store_true", help="smollm2-135m: random weights even when pulled")
    p.add_argument("--finetuning", default=None, help="comma-separated lora,full (default both; --tiny: full)")
    p.add_argument("--cutoffs", default=None, help="comma-separated sequence lengths (default 256,512)")
    p.add_argument("--seq-len", type=int, default=None, help="one sequence length (prompt + response) instead")
    p.add_argument("--prompt-len", type=int, default=None, help="default: half of the sequence length")
    p.add_argument("--batch", type=int, default=None, help="pairs per step (default 2; --tiny: 4)")
    p.add_argument("--reps", type=int, default=None, help="default 3; --tiny: 7")
    p.add_argument("--steps", type=int, default=None, help="steps per repetition (default 1; --tiny: 2)")
    p.add_argument("--warmup", type=int, default=None, help="steps per side before timing, the first is step 0 "
                   "(default 1; --tiny: 2)")  # fmt: skip
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--ours", nargs="*", default=["pack_pairs=true"], help="our config keys (key=value)")
    p.add_argument("--no-memory", action="store_true", help="skip the child processes that measure peak memory")
    p.add_argument("--memory-only", action="store_true", help="only the peak memory (a long case in two calls)")
    p.add_argument("--memory-at", type=int, nargs="*", default=None, help="measure peak memory at these cutoffs only")
    p.add_argument("--sweep-seq", type=int, nargs="+", default=[128, 256, 512, 1024])
    p.add_argument("--sweep-batch", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--with-trl", action="store_true", help="sweep: time TRL too")
    p.add_argument(
        "--quick", action="store_true", help="--tiny, seq 128, 2 reps of 1 step, no memory (make bench-quick)"
    )
    p.add_argument("--json", default=None, help="output file (default benchmarks/results/bench_<mode>_<device>_<model>"
                   ".json; --quick: in the temporary directory)")  # fmt: skip
    p.add_argument("--memory-child", nargs=3, metavar=("PAIR", "SIDE", "SPEC"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.pairs = [x for x in args.pairs.split(",") if x]
    unknown = [x for x in args.pairs if x not in PAIRS]
    if unknown:
        p.error(f"unknown pair(s) {unknown}; choose from {PAIRS}")
    if args.quick:
        args.tiny, args.seq_len, args.no_memory = True, args.seq_len or 128, True
        args.reps, args.steps, args.warmup = args.reps or 2, args.steps or 1, args.warmup or 1
        args.sweep_seq, args.sweep_batch = [64, 128], [1, 2]
    tiny = args.tiny or args.preset == "cpu-small"
    args.preset = args.preset or ("cpu-small" if args.tiny else "smollm2-135m")
    defaults = dict(batch=4, reps=7, steps=2, warmup=2) if tiny else dict(batch=2, reps=3, steps=1, warmup=1)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.finetuning = [x for x in (args.finetuning or ("full" if tiny else "lora,full")).split(",") if x]
    if any(x not in FINETUNING for x in args.finetuning):
        p.error(f"--finetuning takes {FINETUNING}; got {args.finetuning}")
    if args.seq_len:
        args.cutoffs = [args.seq_len]
    else:
        args.cutoffs = [int(x) for x in (args.cutoffs or "256,512").split(",")] if not tiny else [512]
    args.named_by_pair = tiny  # the tiny model's results keep their old names: rm, dpo, dpo_precomputed
    return args


def build_cases(args, base: Setup) -> list[tuple[str, str, Setup]]:
    """(name, pair, shape) for each pair x fine-tuning x cutoff: `dpo_smollm2_135m_lora_256`."""
    cases = []
    tag = MODEL_TAGS[args.preset]
    for seq_len in args.cutoffs:
        for finetuning in args.finetuning:
            prompt_len = args.prompt_len or seq_len // 2
            if not 1 <= prompt_len <= seq_len - 2:
                raise SystemExit(f"--prompt-len must lie in [1, seq_len - 2]; got {prompt_len} for {seq_len}")
            setup = Setup(**{**asdict(base), "seq_len": seq_len, "prompt_len": prompt_len, "finetuning": finetuning})
            for pair in args.pairs:
                if args.named_by_pair:
                    name = pair if finetuning == "full" else f"{pair}_{finetuning}"
                else:
                    name = f"{pair}_{tag}_{finetuning}_{seq_len}"
                cases.append((name, pair, setup))
    return cases


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.memory_child:
        memory_child(*args.memory_child)
        return {}
    from discoalign.config.loader import parse_overrides

    torch.set_num_threads(args.threads)
    os.environ["BENCH_THREADS"] = str(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    import transformers
    import trl

    default_dir = tempfile.gettempdir() if args.quick else RESULTS_DIR
    path = args.json or os.path.join(default_dir, f"bench_{args.mode}_{device}_{MODEL_TAGS[args.preset]}.json")
    with tempfile.TemporaryDirectory(prefix="bench_vs_trl_") as workdir:
        real = real_weights_available(args.preset) and not args.random_weights
        policy_dir, ref_dir = build_models(workdir, args.preset, real=real)
        base = Setup(policy_dir, ref_dir, device, device == "cuda", args.batch, args.cutoffs[0], 1, pool=2,
                     ours_keys=parse_overrides(args.ours))  # fmt: skip
        cases = build_cases(args, base)
        peak = matmul_flops(device)
        params = param_counts(policy_dir)
        meta = {
            "command": " ".join(["python", "benchmarks/bench_vs_trl.py", *(argv or sys.argv[1:])]),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "device": torch.cuda.get_device_name() if device == "cuda" else cpu_name(),
            "threads": args.threads, "preset": args.preset, "model": PRESETS[args.preset],
            "weights": "real (pulled SmolLM2-135M-Instruct)" if real else "random", "params": params,
            "cutoffs": args.cutoffs, "finetuning": args.finetuning, "prompt_len": args.prompt_len or "half",
            "batch": args.batch, "reps": args.reps, "steps": args.steps, "warmup": args.warmup,
            "precision": "bf16" if device == "cuda" else "fp32", "ours_keys": base.ours_keys,
            "matmul_tflops": peak / 1e12, "load_average_start": load_average(),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__},
        }  # fmt: skip
        print(f"{meta['device']} ({device}, {args.threads} threads), matmul {peak / 1e9:.0f} GFLOP/s, "
              f"load average {meta['load_average_start']}; model {args.preset}, {meta['weights']} weights "
              f"({params['body'] / 1e6:.1f}M body + {params['lm_head'] / 1e6:.1f}M LM-head params); cutoffs "
              f"{args.cutoffs}, batch {args.batch} pairs, {args.finetuning}; ours: {base.ours_keys}", flush=True)  # fmt: skip
        if args.mode == "compare":
            results = compare(args, cases, workdir, peak, save=lambda partial: write_json(path, meta, partial))
            print_compare(results, device)
        else:
            results = sweep(args, cases[0][2], workdir)
            print_sweep(results)
    meta["load_average_end"] = load_average()
    print(f"\nload average at the end: {meta['load_average_end']}")
    out = write_json(path, meta, results)
    print(f"wrote {path}")
    return out


def write_json(path: str, meta: dict[str, Any], results: dict[str, Any]) -> dict[str, Any]:
    out = {"meta": meta, "results": results}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(out, f, indent=2)
    os.replace(path + ".tmp", path)
    return out


if __name__ == "__main__":
    main()
