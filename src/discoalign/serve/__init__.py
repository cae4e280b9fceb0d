"""`discoalign serve`: an HTTP server for a reward model (OpenRLHF's remote reward-model API) or a policy (OpenAI's
chat completions API)."""

from .app import build_app
from .chat_app import build_chat_app
from .chat_engine import ChatEngine
from .scorer import RewardScorer
from .server import serve
from .settings import ServeSettings

__all__ = ["ChatEngine", "RewardScorer", "ServeSettings", "build_app", "build_chat_app", "serve"]
