"""GGUF files (llama.cpp's format) as plain transformers models.

transformers reads a GGUF file with `from_pretrained(folder, gguf_file=...)` (the `gguf` package must be
installed) and de-quantises every tensor to the requested dtype. The model it returns still carries a GGUF
"quantizer", so `save_pretrained` refuses it ("quantized with gguf and is not serializable") and every folder saved
from a run on it would inherit the GGUF `quantization_config`. `load_gguf_causal_lm` therefore rebuilds the model
from its config (without that entry) and loads the de-quantised state dict into it: the result is an ordinary model
with ordinary weights. Q4_1-dequantised weights are *not* the bf16 release (each block of 32 weights is rounded to
16 levels); docs/real_model.md says what that changes.
"""

from __future__ import annotations

import logging
import os

import torch

from ..errors import CheckpointError

logger = logging.getLogger(__name__)

SMOKE_PROMPT = "What is the capital of France?"
SMOKE_TOKENS = 12  # enough for "The capital of France is Paris."


def gguf_path(folder: str, gguf_file: str) -> str:
    """The GGUF file `gguf_file` of `folder` (an absolute `gguf_file` is used as it is); CheckpointError if absent."""
    path = os.path.join(os.path.expanduser(folder), os.path.expanduser(gguf_file))
    if not os.path.isfile(path):
        raise CheckpointError(f"`gguf_file: {gguf_file}`: there is no file {path!r} (a GGUF file inside "
                              "`model_name_or_path`, or an absolute path).")  # fmt: skip
    return path


def load_gguf_tokenizer(folder: str, gguf_file: str):
    """The tokenizer (with its chat template) stored in the GGUF file's metadata."""
    from transformers import AutoTokenizer

    path = gguf_path(folder, gguf_file)
    try:
        return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    except (OSError, ValueError, KeyError, ImportError) as e:
        raise CheckpointError(f"Could not read a tokenizer from the GGUF file {path!r}: {_one_line(e)}") from None


def load_gguf_causal_lm(folder: str, gguf_file: str, dtype=torch.float32, **kwargs):
    """A plain (serialisable, trainable) causal LM with the de-quantised weights of a GGUF file.

    kwargs go to `from_pretrained` (e.g. `attn_implementation`). Logs the de-quantisation: the weights are the
    GGUF's quantised values expanded to `dtype`, not the original release.
    """
    from transformers import AutoModelForCausalLM

    path = gguf_path(folder, gguf_file)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(
            os.path.dirname(path), gguf_file=os.path.basename(path), dtype=dtype, **kwargs
        )
    except (OSError, ValueError, KeyError, RuntimeError, ImportError) as e:
        raise CheckpointError(f"Could not load the GGUF file {path!r}: {_one_line(e)}") from None
    config = loaded.config
    quantization = getattr(config, "quantization_config", None)
    if quantization is not None:
        del config.quantization_config  # a plain model: nothing downstream must think it is quantised
    config._name_or_path = os.path.dirname(path)
    with torch.random.fork_rng(devices=[]):  # the random init is overwritten; the run's random stream is untouched
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise CheckpointError(f"The GGUF file {path!r} does not fill the model it describes: missing "
                              f"{sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]}.")  # fmt: skip
    model.tie_weights()
    model.generation_config = loaded.generation_config
    model.name_or_path = os.path.dirname(path)
    logger.info(
        "Loaded %s: its %s tensors were de-quantised to %s (the GGUF's quantised values, not the original release's "
        "weights).", path, _gguf_type(path), str(dtype).replace("torch.", ""),
    )  # fmt: skip
    return model.eval()


def _gguf_type(path: str) -> str:
    """The file's quantisation type as llama.cpp names it (e.g. Q4_1), read from its metadata; "quantised" when the
    `gguf` package cannot tell."""
    try:
        from gguf import GGUFReader
        from gguf.constants import LlamaFileType

        field = GGUFReader(path).fields.get("general.file_type")
        if field is None:
            return "quantised"
        return LlamaFileType(int(field.parts[field.data[0]][0])).name.replace("MOSTLY_", "")
    except Exception:  # metadata is for the log line only
        return "quantised"


def greedy_answer(model, tokenizer, prompt: str = SMOKE_PROMPT) -> str:
    """The model's greedy answer to one user message, through the tokenizer's chat template."""
    messages = [{"role": "user", "content": prompt}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    if not torch.is_tensor(ids):
        ids = ids["input_ids"]
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=SMOKE_TOKENS, do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())
