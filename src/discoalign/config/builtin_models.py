"""The names of the built-in tiny models, `builtin:tiny-<arch>`: known to the config checks before any model loads,
built by `models/tiny.py` and `models/tiny_multimodal.py`."""

from __future__ import annotations

BUILTIN_PREFIX = "builtin:tiny-"
TINY_ARCHS = ("llama", "qwen2", "qwen3", "gpt2")
# Encoder-decoder models (AutoModelForSeq2SeqLM): reward models only (`models.seq2seq`).
TINY_SEQ2SEQ_ARCHS = ("t5",)
TINY_MULTIMODAL_ARCHS = ("qwen2-vl", "qwen2.5-vl", "qwen2-audio")


def is_builtin(name: str | None, archs: tuple[str, ...]) -> bool:
    """True when `name` is `builtin:tiny-<arch>` for one of `archs`."""
    return bool(name) and name in {BUILTIN_PREFIX + arch for arch in archs}
