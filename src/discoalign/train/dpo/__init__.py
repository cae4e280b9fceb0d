"""Stage `dpo`: DPO, DiscoDPO and dynamic-beta (LeDPO) preference optimisation."""

from .workflow import run_dpo

__all__ = ["run_dpo"]
