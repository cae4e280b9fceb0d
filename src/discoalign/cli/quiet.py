"""What a run prints: our messages, transformers' warnings, the training progress bar; not third-party noise a
user cannot act on. `--verbose` shows everything (our DEBUG lines, transformers' INFO lines, every warning, the
loading and writing progress bars).

Warnings raised by our own calls are fixed where they arise, not filtered (e.g. the tokenizer's "sequence length
is longer than the specified maximum" warning: the data is truncated to `cutoff_len` by `data.encode`, and
`cutoff_len` is limited to the model's positions, so `models.loader` marks it as said). The rest is the list below,
each entry with why it is dropped; anything else still shows.
"""

from __future__ import annotations

import logging
import re
import warnings

# (logger name, message pattern, why it is dropped)
LOG_NOISE: tuple[tuple[str, str, str], ...] = (
    ("DeepSpeed", r"Setting accelerator to CPU",
     "DeepSpeed, imported by accelerate when installed, reports that a CPU-only machine has no GPU; every run on "
     "such a machine printed it, and a GPU run never does"),
)  # fmt: skip

# (category, message pattern, why it is dropped): Python warnings raised inside third-party code.
WARNING_NOISE: tuple[tuple[type[Warning], str, str], ...] = (
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated",
     "peft 0.21 reads transformers' deprecated `is_gradient_checkpointing` when it wraps a model in LoRA "
     "(`getattr(model, 'is_gradient_checkpointing', True)` in PeftModel.__init__); every LoRA run printed it, and "
     "nothing of ours reads it"),
)  # fmt: skip


class _DropNoise(logging.Filter):
    def __init__(self, patterns: list[str]) -> None:
        super().__init__()
        self.pattern = re.compile("|".join(patterns))

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def setup_output(verbose: bool = False) -> None:
    """Our log format and levels, and the noise filters unless `verbose`."""
    logging.basicConfig(format="[discoalign] %(levelname)s %(message)s", level=logging.INFO)
    import datasets
    import transformers

    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    if verbose:
        logging.getLogger("discoalign").setLevel(logging.DEBUG)
        transformers.logging.set_verbosity_info()
        transformers.logging.enable_progress_bar()
        warnings.simplefilter("default")  # every warning, once per place
        return
    transformers.logging.set_verbosity_warning()
    # "Loading weights" / "Writing model shards" bars of transformers; the Trainer's training bar stays.
    transformers.logging.disable_progress_bar()
    by_logger: dict[str, list[str]] = {}
    for name, pattern, _ in LOG_NOISE:
        by_logger.setdefault(name, []).append(pattern)
    for name, patterns in by_logger.items():
        logger = logging.getLogger(name)  # the same object the library gets when it creates it later
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise(patterns))
    for category, pattern, _ in WARNING_NOISE:
        warnings.filterwarnings("ignore", message=pattern, category=category)
