"""`discoalign serve`: load the model, choose its API (a reward model: OpenRLHF's `/get_reward`; a policy: OpenAI's
`/v1/chat/completions`), and run uvicorn with the header timeout of `serve.protocol` until interrupted."""

from __future__ import annotations

import logging
import socket

from ..errors import ConfigError
from .settings import settings_from_flags

logger = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def model_kind(model_dir: str) -> str:
    """ "reward" for a reward model (a value head trained as a reward), else "policy" (SFT, DPO or PPO output)."""
    from ..export.exporter import checkpoint_heads

    heads = checkpoint_heads(model_dir)
    return "reward" if heads["value_head"] and heads.get("value_head_kind", "reward") == "reward" else "policy"


def build_for(ns, settings):
    """(app, one line describing what is served) for the flags `ns`."""
    import os

    kind = ns.kind
    if kind == "auto":
        if not os.path.isdir(ns.model):
            raise ConfigError(f"--model {ns.model!r} is not a directory holding a model.")
        kind = model_kind(ns.model)
    if kind == "reward":
        from .app import build_app
        from .scorer import RewardScorer

        scorer = RewardScorer(ns.model, disco_risk_coef=ns.disco_risk_coef, dtype=ns.dtype, device=ns.device)
        what = f"{'Disco' if scorer.disco else 'scalar'} reward model"
        return build_app(scorer, settings), what, ["/get_reward", "/health"]
    from .chat_app import build_chat_app
    from .chat_engine import ChatEngine

    engine = ChatEngine(ns.model, dtype=ns.dtype, device=ns.device)
    return build_chat_app(engine, settings), "policy", ["/v1/chat/completions", "/v1/models", "/health"]


def serve(ns) -> None:
    """Run the server until interrupted."""
    try:
        import starlette  # noqa: F401
        import uvicorn
    except ImportError:
        raise ConfigError("`discoalign serve` needs starlette and uvicorn: pip install 'discoalign[serve]'.") from None
    settings = settings_from_flags(ns)
    if ns.host not in LOOPBACK:
        if settings.api_key is None:
            logger.warning("Binding %s without an API key: any machine that can reach this address can use the "
                           "model. Set --api-key (or DISCOALIGN_API_KEY) to require `Authorization: Bearer <key>`.",
                           ns.host)  # fmt: skip
    app, what, routes = build_for(ns, settings)
    from .protocol import timed_h11_protocol

    # Bind here, so that `--port 0` (the OS picks a free port) prints the port actually bound.
    family = socket.AF_INET6 if ":" in ns.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((ns.host, ns.port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"Cannot bind {ns.host}:{ns.port}: {e.strerror or e}. Choose another --port.") from None
    port = sock.getsockname()[1]
    key = ", API key required" if settings.api_key else ""
    print(f"Serving {ns.model} ({what}{key}) at http://{ns.host}:{port}{routes[0]}  ({', '.join(routes[1:])})",
          flush=True)  # fmt: skip
    config = uvicorn.Config(app, log_level="warning", backlog=2048, http=timed_h11_protocol(settings.header_timeout),
                            timeout_keep_alive=5)  # fmt: skip
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
