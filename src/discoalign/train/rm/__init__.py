"""Stage `rm`: Bradley–Terry and Disco reward modelling."""

from .workflow import run_rm

__all__ = ["run_rm"]
