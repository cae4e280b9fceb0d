"""The `discoalign` command: train, eval, score, bon, export, serve, chat, keys, tiny-model, demo, pull."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import textwrap

from ..errors import ConfigError, DiscoAlignError

EPILOG = textwrap.dedent(
    """\
    examples:
      discoalign train examples/rm_disco.yaml
      discoalign train examples/rm_bt.yaml learning_rate=1e-4 output_dir=saves/bt
      discoalign eval examples/rm_disco.yaml model_name_or_path=saves/rm_disco
      discoalign score --model saves/rm_disco --data pairs.jsonl --out scores.jsonl
      discoalign bon --model saves/rm_disco --candidates candidates.jsonl --kappa 1 --out best.jsonl
      discoalign export --model saves/rm_disco_lora --out exported/rm --layout seq_cls
      discoalign serve --model saves/rm_disco --port 8000
      discoalign chat --model saves/dpo
      discoalign tiny-model --arch qwen3 --out tiny-qwen3
      discoalign pull smollm2-135m-instruct
      discoalign demo
    """
)


DEFAULT_CPU_THREADS = 4


def _set_cpu_threads() -> None:
    """Torch's CPU thread count: OMP_NUM_THREADS when set, else min(4, half the cores).

    Torch's default (one thread per core) collapses when anything else runs: on 2 busy cores (load 5) a 6-step
    tiny RM run took 0.15 s with 1 thread and 3-14 s with 2 (threads spin waiting for each other). Half the cores
    leaves room for the data pipeline and other processes; the cap of 4 is a guess for larger machines (not
    measured here), set OMP_NUM_THREADS to tune. The threads only run CPU ops: GPU runs are unaffected.
    """
    import torch

    if os.environ.get("OMP_NUM_THREADS"):  # torch has read it itself
        logging.getLogger(__name__).debug("torch uses %d CPU threads (OMP_NUM_THREADS).", torch.get_num_threads())
        return
    threads = max(1, min(DEFAULT_CPU_THREADS, (os.cpu_count() or 2) // 2))
    torch.set_num_threads(threads)
    logging.getLogger(__name__).debug("torch uses %d CPU threads (set OMP_NUM_THREADS to change).", threads)


def cmd_train_or_eval(ns: argparse.Namespace) -> int:
    from ..config.loader import parse_overrides, read_yaml
    from ..train.tuner import run_exp
    from .run_config import command_config

    raw = read_yaml(ns.config)
    overrides = parse_overrides(ns.overrides)
    raw.update(overrides)
    cfg = command_config(ns.command, raw, source=repr(ns.config), overrides=set(overrides))
    run_exp(cfg)
    if cfg.training.process_index == 0:  # once per run, not once per process
        print(f"\nOutputs in {os.path.abspath(cfg.training.output_dir)}")
    return 0


def cmd_score(ns: argparse.Namespace) -> int:
    from ..eval.score import score_file

    summary = score_file(ns.model, ns.data, ns.out, cutoff_len=ns.cutoff_len, batch_size=ns.batch_size,
                         skip_invalid_rows=ns.skip_invalid_rows)  # fmt: skip
    skipped = ", ".join(f"{n} {reason}" for reason, n in summary.skipped.items())
    print(
        f"Wrote {summary.written} scored responses ({summary.kind} rows) to {ns.out}"
        + (f"; skipped {sum(summary.skipped.values())} of {summary.rows} rows: {skipped}" if skipped else "")
    )
    return 0


def cmd_bon(ns: argparse.Namespace) -> int:
    from ..eval.bon import rerank_file, sample_and_select

    if bool(ns.candidates) == bool(ns.policy):
        raise ConfigError(
            "`discoalign bon` needs either --candidates FILE (rerank prompt + response rows) or "
            "--policy DIR with --prompts FILE (sample --n responses per prompt), not both."
        )
    common = dict(kappa=ns.kappa, cutoff_len=ns.cutoff_len, batch_size=ns.batch_size,
                  skip_invalid_rows=ns.skip_invalid_rows)  # fmt: skip
    if ns.candidates:
        summary = rerank_file(ns.model, ns.candidates, ns.out, **common)
    else:
        if not ns.prompts:
            raise ConfigError("`discoalign bon --policy` needs --prompts: a file of prompts (any format PPO reads).")
        summary = sample_and_select(ns.model, ns.policy, ns.prompts, ns.out, n=ns.n, max_new_tokens=ns.max_new_tokens,
                                    temperature=ns.temperature, seed=ns.seed, **common)  # fmt: skip
    print(
        f"Selected the best of {summary.candidates} candidates for {summary.prompts} prompts "
        f"(mean - {ns.kappa} * sigma); wrote {ns.out}"
    )
    return 0


def cmd_tiny_model(ns: argparse.Namespace) -> int:
    from ..models.tiny import TINY_ARCHS, write_tiny_model
    from ..models.tiny_multimodal import write_tiny_multimodal_model

    write = write_tiny_model if ns.arch in TINY_ARCHS else write_tiny_multimodal_model
    out = write(ns.arch, ns.out, seed=ns.seed)
    print(f"Wrote a tiny random {ns.arch} model and its tokenizer to {out}")
    return 0


def cmd_demo(ns: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(ns.output_dir, parts=ns.parts)
    return 0


def _version() -> str:
    from .. import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="discoalign",
        description="Preference alignment of Hugging Face LMs with Disco (Normal) rewards and dynamic beta.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"discoalign {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train_eval_parsers(sub)
    _add_score_parser(sub)
    _add_bon_parser(sub)
    _add_small_parsers(sub)

    from .chat import add_chat_parser
    from .export_serve import add_export_parser, add_serve_parser
    from .pull import add_pull_parser

    add_export_parser(sub)
    add_serve_parser(sub)
    add_chat_parser(sub)
    add_pull_parser(sub)
    for command in sub.choices.values():
        command.add_argument("-v", "--verbose", action="store_true",
                             help="Show everything: debug lines, transformers' info, every third-party warning and "
                             "progress bar (cli/quiet.py lists what is hidden otherwise).")  # fmt: skip
    return parser


def _add_train_eval_parsers(sub) -> None:
    for name, helptext in (
        ("train", "Train a stage (sft, rm, dpo, ppo) from a flat YAML config."),
        ("eval", "Evaluate a trained model on a dataset, without training."),
    ):
        p = sub.add_parser(
            name,
            help=helptext,
            description=helptext
            + " Any key of the YAML (and any transformers.TrainingArguments key) can be overridden as key=value."
            + (" With no eval_dataset/val_size, `dataset` is evaluated." if name == "eval" else ""),
        )
        p.add_argument("config", help="Path to a flat YAML config, e.g. examples/rm_disco.yaml.")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="Overrides, e.g. learning_rate=1e-4.")
        p.set_defaults(func=cmd_train_or_eval)


def _add_score_parser(sub) -> None:
    p = sub.add_parser(
        "score",
        help="Score responses with a trained reward model.",
        description="Score every response of a preference file (both chosen and rejected) with a reward model; "
        "writes one JSON line per response with `mean` and, for Disco models, `variance`.",
    )
    p.add_argument("--model", required=True, help="Reward-model directory (ours, LlamaFactory/TRL, or seq-cls).")
    p.add_argument("--data", required=True, help="Preference data file or folder (any supported format).")
    p.add_argument("--out", required=True, help="Output .jsonl path.")
    p.add_argument("--cutoff-len", type=int, default=1024, help="Maximum prompt+response tokens (default 1024).")
    p.add_argument("--batch-size", type=int, default=16, help="Responses per forward (default 16).")
    p.add_argument("--skip-invalid-rows", action="store_true", help="Drop bad rows, counted per reason (else stop).")
    p.set_defaults(func=cmd_score)


def _add_bon_parser(sub) -> None:
    p = sub.add_parser(
        "bon",
        help="Best-of-n: keep the response with the highest mean - kappa * sigma per prompt.",
        description="Rerank a candidate file (prompt + response rows; rows sharing a prompt compete), or sample --n "
        "responses per prompt from --policy, and keep the best by mean - kappa * sigma of the reward model (sigma: "
        "Disco aleatoric + epistemic). Writes one JSON line per prompt: `messages` (prompt + best response, "
        "usable as SFT data), its scores, and every candidate's scores.",
    )
    p.add_argument("--model", required=True, help="Reward-model directory.")
    p.add_argument("--candidates", help="Prompt + response rows to rerank.")
    p.add_argument("--policy", help="Policy directory to sample from (with --prompts).")
    p.add_argument("--prompts", help="Prompt file for --policy (any format PPO reads).")
    p.add_argument("--out", required=True, help="Output .jsonl path.")
    p.add_argument("--kappa", type=float, default=0.0, help="objective = mean - kappa * sigma (default 0).")
    p.add_argument("--n", type=int, default=8, help="Responses sampled per prompt with --policy (default 8).")
    p.add_argument("--max-new-tokens", type=int, default=64, help="Most tokens per sampled response (default 64).")
    p.add_argument("--temperature", type=float, default=1.0, help="Sampling temperature (default 1.0).")
    p.add_argument("--seed", type=int, default=0, help="Sampling seed (default 0).")
    p.add_argument("--cutoff-len", type=int, default=1024, help="Maximum prompt+response tokens (default 1024).")
    p.add_argument("--batch-size", type=int, default=16, help="Sequences per forward (default 16).")
    p.add_argument("--skip-invalid-rows", action="store_true", help="Drop bad rows (counted) instead of stopping.")
    p.set_defaults(func=cmd_bon)


def _add_small_parsers(sub) -> None:
    """tiny-model, demo and keys."""
    p = sub.add_parser(
        "tiny-model",
        help="Write a tiny random model and a locally trained tokenizer.",
        description="Write a tiny random model (hidden 64, 2 layers) and a byte-level BPE tokenizer with a "
        "ChatML chat template, trained offline. Text archs load with AutoModelForCausalLM/AutoTokenizer; the "
        "multimodal ones also write their image processor / feature extractor.",
    )
    p.add_argument(
        "--arch",
        required=True,
        choices=["llama", "qwen2", "qwen3", "gpt2", "qwen2-vl", "qwen2.5-vl", "qwen2-audio"],
        help="Architecture.",
    )
    p.add_argument("--out", required=True, help="Output directory.")
    p.add_argument("--seed", type=int, default=0, help="Weight seed (default 0).")
    p.set_defaults(func=cmd_tiny_model)

    p = sub.add_parser(
        "demo",
        help="Train BT and Disco reward models, the DPO grid and PPO on built-in data and compare them.",
        description="Runs the main jobs on builtin:tiny-qwen3 and builtin:synthetic and prints comparison tables.",
    )
    p.add_argument("--output-dir", default="saves/demo", help="Where runs, metrics and plots go.")
    p.add_argument("--parts", default="rm,dpo,ppo", help="Comma-separated parts to run: rm, dpo, ppo (default all).")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "keys",
        help="List the config keys by concern (model, data, heads, DPO, PPO, speed, ...), with defaults and help.",
        description="Every key a run's YAML may hold, grouped by concern, with its default and meaning (the same as "
        "docs/config_keys.md). Any transformers.TrainingArguments key is accepted as well.",
    )
    from ..config.keys import GROUPS  # cheap: the config package loads neither torch nor transformers

    p.add_argument("group", nargs="?", help=f"Show one group only (any case): {', '.join(GROUPS)}.")
    p.set_defaults(func=cmd_keys)


def cmd_keys(ns: argparse.Namespace) -> int:
    from ..config.keys import GROUPS, render

    if ns.group is not None and ns.group.lower() not in (g.lower() for g in GROUPS):
        raise ConfigError(f"There is no key group {ns.group!r}; the groups are {', '.join(GROUPS)}.")
    print(render(ns.group), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    from .quiet import setup_output

    setup_output(verbose=getattr(ns, "verbose", False))
    if ns.command in ("train", "eval", "score", "demo", "pull"):
        _set_cpu_threads()
    try:
        code = ns.func(ns)
        if ns.command in ("train", "eval"):
            from ..train.distributed import shutdown_process_group

            shutdown_process_group()  # under torchrun: a clean exit on every rank
        return code
    except DiscoAlignError as e:
        message = " ".join(str(e).split())
        print(f"\ndiscoalign: error: {message}", file=sys.stderr)
        return e.exit_code
    except OSError as e:
        # A disk that fills up or a folder made read-only mid-run: name the path, not a traceback.
        where = f" {e.filename!r}" if e.filename else ""
        print(f"\ndiscoalign: error: cannot write or read{where}: {e.strerror or e}. Free space or fix the "
              "permissions, then run again (a run with checkpoints can resume with `resume_from_checkpoint`).",
              file=sys.stderr)  # fmt: skip
        return 2
    except KeyboardInterrupt:
        print("\ndiscoalign: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
