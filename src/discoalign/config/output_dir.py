"""`output_dir` checks, run before any model loads: it must be a writable folder, and a training run must not
mix its files with those of an earlier run there (unless `overwrite_output_dir: true` or resuming)."""

from __future__ import annotations

import fnmatch
import logging
import os
import shutil

from ..errors import ConfigError

logger = logging.getLogger(__name__)

# What a run of ours writes into `output_dir` (files and folders); overwriting deletes these and nothing else.
OUR_FILES = (
    "discoalign_config.yaml", "heads.safetensors", "heads_config.json", "config.json", "generation_config.json",
    "model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin",
    "adapter_model.safetensors", "adapter_model.bin", "adapter_config.json",
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
    "processor_config.json", "video_preprocessor_config.json",
    "training_args.bin", "trainer_state.json", "all_results.json", "train_results.json", "eval_results.json",
    "predictions.jsonl", "samples.jsonl", "plots", "checkpoint-*", "runs",
)  # fmt: skip
# Any of these means "a run of ours has been here" (tokenizer or config files alone may be a user's model).
RUN_MARKERS = ("discoalign_config.yaml", "trainer_state.json", "all_results.json", "train_results.json",
               "eval_results.json", "checkpoint-*", "heads.safetensors")  # fmt: skip
PROBE_NAME = ".discoalign_write_probe"


def _matching(names: list[str], patterns: tuple[str, ...]) -> list[str]:
    return sorted(n for n in names if any(fnmatch.fnmatch(n, p) for p in patterns))


def ensure_writable(output_dir: str, key: str = "output_dir") -> None:
    """Create `output_dir` and write (then delete) a probe file in it; ConfigError naming the path otherwise."""
    path = os.path.abspath(output_dir)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"`{key}: {output_dir}` is an existing file ({path}); it must be a folder. Choose another "
                          "`output_dir`.")  # fmt: skip
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, PROBE_NAME)
        with open(probe, "w", encoding="utf-8") as f:
            f.write("probe")
        os.remove(probe)
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise ConfigError(f"`{key}: {output_dir}` cannot be written ({reason}: {e.filename or path}). Choose a folder "
                          "you can write to, or fix its permissions.") from None  # fmt: skip


def check_resume(output_dir: str, resume_from_checkpoint: str | bool | None) -> None:
    """`resume_from_checkpoint` must name an existing checkpoint folder (`true`: the last one in `output_dir`);
    the Trainer would otherwise stop with a traceback after the model and data loaded."""
    if resume_from_checkpoint in (None, False, ""):
        return
    if resume_from_checkpoint is True or str(resume_from_checkpoint).lower() == "true":
        from transformers.trainer_utils import get_last_checkpoint

        if not os.path.isdir(output_dir) or get_last_checkpoint(output_dir) is None:
            raise ConfigError(f"`resume_from_checkpoint: true` but `output_dir: {output_dir}` holds no checkpoint-* "
                              "folder to resume from. Name the checkpoint folder, or drop the key.")  # fmt: skip
        return
    if not os.path.isdir(str(resume_from_checkpoint)):
        raise ConfigError(f"`resume_from_checkpoint: {resume_from_checkpoint}` is not a folder (relative paths start "
                          f"from {os.getcwd()!r}); name a checkpoint-* folder of an earlier run.")  # fmt: skip


def prepare_output_dir(output_dir: str, *, do_train: bool, overwrite: bool, resuming: bool) -> None:
    """Check `output_dir` before a run starts; with `overwrite`, delete an earlier run's files there first.

    A training run into a folder that holds an earlier run is refused unless `overwrite` or `resuming`: its
    checkpoints, predictions, plots and `all_results.json` would otherwise mix with the new ones. Evaluation
    alone may write into a trained model's folder (that is where `discoalign eval` puts its results).
    """
    ensure_writable(output_dir)
    if not do_train or resuming:
        return
    names = os.listdir(output_dir)
    if not _matching(names, RUN_MARKERS):
        return
    ours = _matching(names, OUR_FILES)
    if not overwrite:
        shown = ", ".join(ours[:6]) + (", ..." if len(ours) > 6 else "")
        raise ConfigError(
            f"`output_dir: {output_dir}` already holds a run ({shown}); "
            "training into it would mix old checkpoints, predictions and results with new ones. Choose another "
            "`output_dir`, set `overwrite_output_dir: true` to delete that run's files first, or set "
            "`resume_from_checkpoint` to continue it."
        )
    for name in ours:
        path = os.path.join(output_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    logger.warning("overwrite_output_dir: deleted %d files/folders of the earlier run in %s.", len(ours), output_dir)
