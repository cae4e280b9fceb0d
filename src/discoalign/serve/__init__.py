"""`discoalign serve`: an HTTP reward server speaking OpenRLHF's remote reward-model API."""

from .app import ServeSettings, build_app, serve
from .scorer import RewardScorer

__all__ = ["RewardScorer", "ServeSettings", "build_app", "serve"]
