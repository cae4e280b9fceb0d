"""`discoalign export`: merge a LoRA adapter into its base, keep the heads, write the layouts other tools load."""

from .exporter import LAYOUTS, export_model

__all__ = ["LAYOUTS", "export_model"]
