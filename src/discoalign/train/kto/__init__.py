"""Stage `kto`: KTO (Ethayarajh et al. 2024) on unpaired desirable / undesirable completions."""

from .workflow import run_kto

__all__ = ["run_kto"]
