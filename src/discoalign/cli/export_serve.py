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
    from ..serve.settings import API_KEY_ENV, ServeSettings

    d = ServeSettings()
    p = sub.add_parser(
        "serve",
        help="Serve a reward model (OpenRLHF's API) or a policy (OpenAI's chat completions API) over HTTP.",
        description='A reward model: POST /get_reward with {"query": [texts], "prompts": [...]} returns {"rewards", '
        '"scores", "mean", "variance"}, requests batched up to a token budget. A policy (SFT, DPO or PPO output): '
        "POST /v1/chat/completions (OpenAI's body and answer, `stream` included) and GET /v1/models. Both: GET "
        "/health. Binds 127.0.0.1 by default; with --api-key every request needs `Authorization: Bearer <key>`. "
        "See docs/serve.md.",
    )
    p.add_argument("--model", required=True, help="A reward model or a policy directory (ours, LlamaFactory/TRL).")
    p.add_argument("--kind", default="auto", choices=["auto", "reward", "policy"],
                   help="What --model is (default: a value head trained as a reward means reward, else policy).")  # fmt: skip
    p.add_argument("--host", default="127.0.0.1", help="Address to bind (default 127.0.0.1: this machine only).")
    p.add_argument("--port", type=int, default=8000, help="Port (default 8000; 0 lets the OS choose).")
    p.add_argument("--api-key", default=None,
                   help=f"Require `Authorization: Bearer <key>` on every request (default: ${API_KEY_ENV} when set, "
                   "else no key). Use at least 16 characters.")  # fmt: skip
    p.add_argument("--cutoff-len", type=int, default=d.cutoff_len, help="Longest query in tokens; longer get 413.")
    p.add_argument("--max-batch-tokens", type=int, default=d.max_batch_tokens,
                   help=f"Token budget of one forward: items x longest item (default {d.max_batch_tokens}).")  # fmt: skip
    p.add_argument("--max-queue", type=int, default=d.max_queue,
                   help=f"Most items (reward) or requests (chat) waiting; beyond it 503 (default {d.max_queue}).")  # fmt: skip
    p.add_argument("--max-request-bytes", type=int, default=d.max_request_bytes,
                   help="Largest request body; larger ones get 413 (default 8 MiB).")  # fmt: skip
    p.add_argument("--max-request-items", type=int, default=d.max_request_items,
                   help=f"Most queries in one reward request; more get 413 (default {d.max_request_items}).")  # fmt: skip
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens,
                   help=f"Chat: the most tokens one answer may ask for (default {d.max_new_tokens}).")  # fmt: skip
    p.add_argument("--header-timeout", type=float, default=d.header_timeout,
                   help=f"Seconds a client has to send a request's headers, else it is disconnected (default "
                   f"{d.header_timeout:g}).")  # fmt: skip
    p.add_argument("--body-timeout", type=float, default=d.body_timeout,
                   help=f"Seconds a client has to send a request's body, else 408 (default {d.body_timeout:g}).")  # fmt: skip
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available, else cpu).")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="Backbone dtype (default float32; heads stay float32).")  # fmt: skip
    p.add_argument("--disco-risk-coef", type=float, default=0.0,
                   help="rewards = mean - coef * sqrt(variance) for a Disco model (default 0: the mean).")  # fmt: skip
    p.set_defaults(func=cmd_serve)
