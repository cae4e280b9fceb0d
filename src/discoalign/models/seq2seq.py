"""Encoder-decoder (T5 / BART family) reward models: the heads read the decoder's last hidden state.

A seq2seq reward model scores a text the way `BartForSequenceClassification` does: the encoder reads the whole
prompt + response, the decoder reads the same tokens shifted one to the right (the decoder start token first),
and the value / variance heads read the decoder's last hidden state at the last non-padding token. Inputs are
the usual (input_ids, attention_mask) of a causal reward model, so the collators, the `rm` trainer and `score`
need no seq2seq path; explicit `decoder_input_ids` / `decoder_attention_mask` may be passed instead.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import ConfigError


def is_seq2seq_config(config: Any) -> bool:
    """True for an encoder-decoder config (a transformers config object or its dict)."""
    if isinstance(config, dict):
        return bool(config.get("is_encoder_decoder", False))
    return bool(getattr(config, "is_encoder_decoder", False))


def decoder_start_id(config: Any) -> int:
    """The decoder start token (T5: pad; BART: eos), from the config."""
    start = getattr(config, "decoder_start_token_id", None)
    if start is None:
        start = getattr(config, "pad_token_id", None)
    if start is None:
        raise ValueError("the seq2seq config has neither decoder_start_token_id nor pad_token_id")
    return int(start)


def shift_right(input_ids: torch.Tensor, attention_mask: torch.Tensor, start_id: int) -> torch.Tensor:
    """(N, T) ids -> (N, T) decoder inputs: at each real position the previous *real* token, `start_id` at a row's
    first real position (left or right padding alike). The decoder's mask is the encoder's: the decoder token at
    position t is real exactly when input token t is, so the last real decoder position is the input's.

    T5 / BART position the tokens by index, so a row with padding *inside* it (a hole) does not score exactly like
    the row without the hole; the collators and PPO (left-padded prompt + right-padded response) never make holes.
    """
    mask = attention_mask.bool()
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    last_real = torch.where(mask, positions, torch.full_like(positions, -1)).cummax(dim=1).values
    previous = torch.cat([torch.full_like(last_real[:, :1], -1), last_real[:, :-1]], dim=1)  # (N, T), -1: none
    shifted = input_ids.gather(1, previous.clamp(min=0))
    return torch.where(previous < 0, torch.full_like(input_ids, start_id), shifted)


def seq2seq_hidden_states(
    lm: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, **model_inputs: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoder on (input_ids, attention_mask) (N, T); decoder on the shifted ids -> (hidden (N, T', H), mask (N, T')).

    `model_inputs` may hold `decoder_input_ids` / `decoder_attention_mask` (N, T'); without them T' = T and the
    decoder mask is `attention_mask`. Packed pairs and media inputs are not supported for seq2seq models.
    """
    if model_inputs.get("segment_ids") is not None:
        raise ConfigError("`pack_pairs: true` supports decoder-only models; an encoder-decoder (seq2seq) reward model "
                          "cannot pack pairs. Set `pack_pairs: false`.")  # fmt: skip
    decoder_input_ids = model_inputs.get("decoder_input_ids")
    decoder_mask = model_inputs.get("decoder_attention_mask")
    if decoder_input_ids is None:
        decoder_input_ids = shift_right(input_ids, attention_mask, decoder_start_id(lm.config))
        decoder_mask = attention_mask
    elif decoder_mask is None:
        decoder_mask = torch.ones_like(decoder_input_ids)
    encoder_hidden = lm.get_encoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    out = lm.get_decoder()(
        input_ids=decoder_input_ids,
        attention_mask=decoder_mask,
        encoder_hidden_states=encoder_hidden,
        encoder_attention_mask=attention_mask,
        use_cache=False,
    )
    return out.last_hidden_state, decoder_mask
