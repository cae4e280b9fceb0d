"""`discoalign chat --model <policy>`: talk to a trained policy in the terminal, the answer streamed as it is
generated, with the checkpoint's chat template (the engine of `serve`'s `/v1/chat/completions`)."""

from __future__ import annotations

import argparse
import sys

COMMANDS = "Type a message and press Enter; /clear forgets the conversation, /exit (or Ctrl-D) ends."


def cmd_chat(ns: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..serve.chat_engine import ChatEngine

    if ns.max_new_tokens < 1 or ns.temperature < 0 or not 0 < ns.top_p <= 1:
        raise ConfigError("--max-new-tokens must be positive, --temperature 0 (greedy) or more, --top-p in (0, 1].")
    engine = ChatEngine(ns.model, dtype=ns.dtype, device=ns.device)
    system = [{"role": "system", "content": ns.system}] if ns.system else []
    history: list[dict[str, str]] = []
    out = sys.stdout
    print(f"Chatting with {ns.model}. {COMMANDS}", file=out, flush=True)
    while True:
        try:
            line = input("\nyou> ")
        except EOFError:
            print(file=out)
            return 0
        text = line.strip()
        if text in ("/exit", "/quit"):
            return 0
        if text == "/clear":
            history = []
            print("(conversation cleared)", file=out, flush=True)
            continue
        if not text:
            continue
        history.append({"role": "user", "content": line})
        print("assistant> ", end="", file=out, flush=True)
        try:
            reply = engine.generate(system + history, max_new_tokens=ns.max_new_tokens, temperature=ns.temperature,
                                    top_p=ns.top_p, seed=ns.seed,
                                    on_text=lambda piece: print(piece, end="", file=out, flush=True))  # fmt: skip
        except ConfigError as e:  # the conversation outgrew the model's positions
            history.pop()
            print(f"\n({' '.join(str(e).split())}; /clear starts afresh)", file=out, flush=True)
            continue
        if reply.finish_reason == "length":
            print(f" [cut at --max-new-tokens {ns.max_new_tokens}]", end="", file=out)
        print(file=out, flush=True)
        history.append({"role": "assistant", "content": reply.text})


def add_chat_parser(sub) -> None:
    p = sub.add_parser(
        "chat",
        help="Talk to a trained policy in the terminal (chat template, streamed answers).",
        description="Interactive chat with a policy checkpoint (the output of an sft, dpo or ppo run, full or LoRA): "
        f"the conversation is rendered with its chat template and each answer streamed as it is generated. {COMMANDS}",
    )
    p.add_argument("--model", required=True, help="Policy directory (or builtin:tiny-<arch>).")
    p.add_argument("--system", default=None, help="A system message put before the conversation.")
    p.add_argument("--max-new-tokens", type=int, default=256, help="Most tokens per answer (default 256).")
    p.add_argument("--temperature", type=float, default=0.7, help="Sampling temperature; 0 is greedy (default 0.7).")
    p.add_argument("--top-p", type=float, default=1.0, help="Nucleus sampling (default 1.0: off).")
    p.add_argument("--seed", type=int, default=None, help="Sampling seed of each answer (default: not fixed).")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available, else cpu).")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="Weights dtype (default float32).")  # fmt: skip
    p.set_defaults(func=cmd_chat)
