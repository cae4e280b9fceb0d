"""Segment-aware sdpa for packed pairs: attention work of two plain sequences, not of one long masked row.

A packed pair row is [shared prompt | chosen segment | rejected segment] (see `data.packing`). Through sdpa with
the full (L, L) mask (`pair_attention_mask`), every query meets every key and the mask zeroes what must not be seen: the CPU kernels
cannot skip masked blocks, so a row of L = P + C + R costs L^2 score entries, about twice the two plain causal
sequences it replaces. Here each row runs as two sdpa calls: prompt + chosen causally (the kernels' fast
`is_causal` path), then the rejected segment against [prompt keys | its own keys] with a small bottom-right
causal mask; the prompt-prompt block is computed once.

The implementation is registered with transformers under `PAIR_SDPA` (attention and mask interfaces). Without
`pair_segments` in the call it is plain sdpa, so a model switched to it behaves exactly as before on ordinary
batches, and the name is not saved in checkpoints (transformers keeps `_attn_implementation` out of config.json).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config.attention import PAIR_SDPA, check_attention_implementation
from ..data.packing import PADDING, SHARED
from ..errors import ConfigError


def pair_sdpa_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    pair_segments: list[tuple[int, int, int]] | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """query (B, Hq, L, D), key / value (B, Hkv, L, D) -> ((B, L, Hq, D), None), as transformers' sdpa returns.

    pair_segments: per row, the lengths (shared, chosen segment, rejected segment); positions past their sum
    are padding, whose output is zero (nothing reads it). Without it, this is `sdpa_attention_forward`.
    """
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    if pair_segments is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)  # fmt: skip
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    dropout = dropout if module.training else 0.0
    rows = []
    for b, (shared, chosen, rejected) in enumerate(pair_segments):
        q, k, v = query[b : b + 1], key[b : b + 1], value[b : b + 1]
        first = shared + chosen
        head = F.scaled_dot_product_attention(
            q[:, :, :first], k[:, :, :first], v[:, :, :first], dropout_p=dropout, scale=scaling, is_causal=True
        )
        tail_keys = torch.cat([k[:, :, :shared], k[:, :, first : first + rejected]], dim=2)
        tail_values = torch.cat([v[:, :, :shared], v[:, :, first : first + rejected]], dim=2)
        # Rejected token i sees the whole shared prompt and rejected tokens 0..i.
        visible = torch.ones(rejected, shared + rejected, dtype=torch.bool, device=q.device).tril(diagonal=shared)
        tail = F.scaled_dot_product_attention(
            q[:, :, first : first + rejected], tail_keys, tail_values, attn_mask=visible, dropout_p=dropout,
            scale=scaling,
        )  # fmt: skip
        padding = q.new_zeros(1, q.shape[1], q.shape[2] - first - rejected, q.shape[3])
        rows.append(torch.cat([head, tail, padding], dim=2))
    return torch.cat(rows).transpose(1, 2).contiguous(), None


def register_pair_sdpa() -> None:
    """Make `PAIR_SDPA` a transformers attention implementation (idempotent); its masks are sdpa's."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(PAIR_SDPA, pair_sdpa_attention)
    AttentionMaskInterface.register(PAIR_SDPA, sdpa_mask)


def use_pair_sdpa(causal_lm: nn.Module) -> bool:
    """Switch an sdpa model to `PAIR_SDPA` (same numbers, less work on packed pairs); False when not sdpa."""
    implementation = getattr(causal_lm.config, "_attn_implementation", None)
    if implementation == PAIR_SDPA:
        return True
    if implementation != "sdpa":
        return False
    register_pair_sdpa()
    causal_lm.set_attn_implementation(PAIR_SDPA)
    return True


def pair_attention_mask(segment_ids: torch.Tensor, attn_implementation: str | None, dtype: torch.dtype) -> torch.Tensor:
    """segment_ids (B, L) -> the (B, 1, L, L) mask of packed pairs, in the form the attention implementation takes.

    Query q sees key k when k <= q and k is in the shared prompt or in q's own segment. Padding sees earlier
    padding (never an empty row, which would make softmax NaN); real tokens never see padding (it comes last).
    sdpa takes it as bool (True = attend), eager as an additive float mask (0 or the dtype's minimum). The
    segment-aware sdpa does not read it on packed pairs, but takes the bool form like sdpa.
    """
    check_attention_implementation(attn_implementation)
    length = segment_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segment_ids.device).tril()
    query, key = segment_ids.unsqueeze(-1), segment_ids.unsqueeze(-2)
    visible = causal & (((key == SHARED) & (query != PADDING)) | (key == query))
    visible = visible.unsqueeze(1)
    if attn_implementation == "eager":
        zero = torch.zeros((), dtype=dtype, device=segment_ids.device)
        return torch.where(visible, zero, torch.finfo(dtype).min)
    return visible


def prepare_pair_packing(model: Any) -> None:
    """Before any step: raise ConfigError when `model` (a `ModelWithHeads`) cannot run packed pairs, and switch
    an sdpa model to the segment-aware sdpa (`models.pair_attention`: same numbers, less attention work)."""
    modality = getattr(model, "modality", None)
    if modality is not None and getattr(modality, "value", modality) != "language_only":
        raise ConfigError(
            f"`pack_pairs: true` supports text-only models; this model's modality is {modality.value!r}, whose media "
            "inputs are laid out per sequence. Set `pack_pairs: false`."
        )
    check_attention_implementation(getattr(model.config, "_attn_implementation", None))
    use_pair_sdpa(model.causal_lm)
