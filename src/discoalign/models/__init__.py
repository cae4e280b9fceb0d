"""Backbones with value / variance / beta heads: tiny built-in models, loading, LoRA, checkpoints, interop.

Import from the submodules (`discoalign.models.loader`, `.model_with_heads`, `.checkpoint`, ...); this
package file stays empty so that importing one piece does not import transformers' model zoo.
"""
