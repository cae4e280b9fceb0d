"""A named chat template on a tokenizer (`template:`), and embeddings that cover every token of the tokenizer.

`apply_template` sets the template (`data.chat_templates`), makes its turn-end token the EOS, and adds the marker
tokens the tokenizer lacks (LlamaFactory does the same and then resizes the vocabulary). `fit_embeddings` then grows
the model's input and output embeddings to the tokenizer's length; each new row is the mean of the old rows, a
deterministic choice, so a LoRA adapter trained on top reloads onto exactly the same base (transformers' own
`mean_resizing` samples the new rows at random). With LoRA the new rows stay at that mean (they are not trained).
"""

from __future__ import annotations

import logging

import torch

from ..data.chat_templates import TEMPLATES, jinja_template
from ..errors import ConfigError

logger = logging.getLogger(__name__)


def _is_one_token(tokenizer, text: str) -> bool:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) == 1


def apply_template(tokenizer, name: str) -> None:
    """Give `tokenizer` the chat template `name`: its Jinja text, its marker tokens and its turn-end token as EOS."""
    if name not in TEMPLATES:
        raise ConfigError(f"`template: {name}` is not a template discoalign knows; the templates are "
                          f"{', '.join(TEMPLATES)} (or leave `template` unset to use the tokenizer's own).")  # fmt: skip
    spec = TEMPLATES[name]
    missing = [m for m in spec.markers if not _is_one_token(tokenizer, m)]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
        logger.info("`template: %s` added the token(s) %s to the tokenizer (the embeddings grow to match).", name,
                    ", ".join(missing))  # fmt: skip
    if spec.stop is not None and tokenizer.eos_token != spec.stop:
        if tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.eos_token:
            tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token  # keep the pad id as it was
        tokenizer.eos_token = spec.stop
    tokenizer.chat_template = jinja_template(spec)


def fit_embeddings(model: torch.nn.Module, tokenizer) -> None:
    """Grow the input (and output) embeddings of `model` to `len(tokenizer)` rows, new rows at the old rows' mean."""
    embeddings = model.get_input_embeddings()
    # The module's row count: under DeepSpeed ZeRO-3 the weight itself is a 0-row shard until gathered.
    old = getattr(embeddings, "num_embeddings", None) if embeddings is not None else None
    if old is None or len(tokenizer) <= old:
        return
    if hasattr(embeddings.weight, "ds_id"):
        raise ConfigError(f"The tokenizer has {len(tokenizer)} tokens but the model's embeddings {old} rows (a "
                          "`template` added its marker tokens); growing embeddings that DeepSpeed ZeRO-3 has "
                          "partitioned is not supported. Use the template the tokenizer has the tokens of (or none), "
                          "or ZeRO-2.")  # fmt: skip
    output = model.get_output_embeddings()
    old_out = output.weight.detach()[:old].float().mean(0) if output is not None else None
    old_in = embeddings.weight.detach().float().mean(0)
    with torch.random.fork_rng(devices=[]):  # the resize draws init values that are overwritten below
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight[old:] = old_in.to(model.get_input_embeddings().weight.dtype)
        output = model.get_output_embeddings()
        if output is not None and output.weight is not model.get_input_embeddings().weight:
            output.weight[old:] = old_out.to(output.weight.dtype)
            if getattr(output, "bias", None) is not None:
                output.bias[old:] = 0.0
    logger.info("Embeddings grown from %d to %d rows for the tokenizer's added tokens.", old, len(tokenizer))


def align_special_ids(model: torch.nn.Module, tokenizer) -> None:
    """Write the tokenizer's EOS / BOS / PAD ids into the model's config and generation config (a `template` made
    its turn end the EOS), as the Trainer would on its own, with a warning, when it starts."""
    from transformers import logging as hf_logging
    from transformers.trainer_utils import align_special_tokens

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the warning says what this function is there to do
    try:
        align_special_tokens(model, tokenizer)
    finally:
        hf_logging.set_verbosity(level)
