"""Stage `sft`: supervised fine-tuning on prompt + response data (prompt tokens masked)."""

from .trainer import SFTTrainer, sft_loss
from .workflow import run_sft

__all__ = ["SFTTrainer", "run_sft", "sft_loss"]
