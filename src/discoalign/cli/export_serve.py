"""The `export` and `serve` subcommands: argument parsing only; the work is in `discoalign.export` / `.serve`."""

from __future__ import annotations

import argparse


def cmd_export(ns: argparse.Namespace) -> int:
    from ..export import export_model

    result = export_model(ns.model, ns.out, layout=ns.layout, dtype=ns.dtype)
    heads = ", ".join(result["heads"]) or "no heads"
    merged = "LoRA merged into its base, " if result["merged_lora"] else ""
    print(f"Exported {ns.model} to {ns.out} in the `{ns.layout}` layout ({merged}{heads}).")
    if result.get("value_head_bias"):
        print(f"transformers' `score` has no bias: its logits are our mean minus {result['value_head_bias']:.6g} "
              "(kept in config.json as `discoalign_value_head_bias`).")  # fmt: skip
    return 0


def add_export_parser(sub) -> None:
    from ..export import LAYOUTS

    p = sub.add_parser(
        "export",
        help="Merge a LoRA adapter into its base, keep the heads, write a standalone model.",
        description="Merge a LoRA checkpoint into its base (peft merge_and_unload) and write it, with its heads, in "
        "one of the layouts: ours (discoalign), seq_cls (AutoModelForSequenceClassification with score.weight: TRL, "
        "OpenRLHF, vLLM), llamafactory (causal LM + value_head.safetensors).",
    )
    p.add_argument("--model", required=True, help="Checkpoint directory (ours, full or LoRA; or a foreign RM).")
    p.add_argument("--out", required=True, help="Output directory.")
    p.add_argument("--layout", default="ours", choices=LAYOUTS, help="Output layout (default: ours).")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="Weights dtype (default float32; heads stay float32).")  # fmt: skip
    p.set_defaults(func=cmd_export)


def cmd_serve(ns: argparse.Namespace) -> int:
    from ..serve import serve

    serve(ns)
    return 0


def add_serve_parser(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="Serve a reward model over HTTP (OpenRLHF's remote reward-model API).",
        description='POST /get_reward with {"query": [texts], "prompts": [...]} returns {"rewards", "scores", '
        '"mean", "variance"}; GET /health. Requests are batched up to a token budget; binds 127.0.0.1 by default.',
    )
    p.add_argument("--model", required=True, help="Reward-model directory (ours, LlamaFactory/TRL, or seq-cls).")
    p.add_argument("--host", default="127.0.0.1", help="Address to bind (default 127.0.0.1: this machine only).")
    p.add_argument("--port", type=int, default=8000, help="Port (default 8000; 0 lets the OS choose).")
    p.add_argument("--cutoff-len", type=int, default=2048, help="Longest query in tokens; longer ones get 413.")
    p.add_argument("--max-batch-tokens", type=int, default=16384,
                   help="Token budget of one forward: items x longest item (default 16384).")  # fmt: skip
    p.add_argument("--max-queue", type=int, default=4096,
                   help="Most items waiting to be scored; beyond it requests get 503 (default 4096).")  # fmt: skip
    p.add_argument("--max-request-bytes", type=int, default=8 * 1024 * 1024,
                   help="Largest request body; larger ones get 413 (default 8 MiB).")  # fmt: skip
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available, else cpu).")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="Backbone dtype (default float32; heads stay float32).")  # fmt: skip
    p.add_argument("--disco-risk-coef", type=float, default=0.0,
                   help="rewards = mean - coef * sqrt(variance) for a Disco model (default 0: the mean).")  # fmt: skip
    p.set_defaults(func=cmd_serve)
