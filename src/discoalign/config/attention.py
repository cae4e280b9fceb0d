"""Which attention implementations can run packed pairs (`pack_pairs`, `packing`): one rule, checked at config time.

Packed rows need an arbitrary 4-D mask (bool for sdpa, additive float for eager); flash-attention kernels take
only block-causal masks. `PAIR_SDPA` is our segment-aware sdpa (`models.pair_attention`), which sdpa models are
switched to; it is registered with transformers under this name.
"""

from __future__ import annotations

from ..errors import ConfigError

PAIR_SDPA = "discoalign_pair_sdpa"
MASKED_ATTENTION = ("sdpa", "eager", PAIR_SDPA)


def check_attention_implementation(attn_implementation: str | None) -> None:
    """Raise ConfigError unless the attention takes the arbitrary mask pair packing needs."""
    if attn_implementation not in MASKED_ATTENTION:
        raise ConfigError(
            "`pack_pairs: true` runs chosen and rejected in one row with an attention mask that keeps them apart, "
            f"which needs `attn_implementation` eager or sdpa; this model uses {attn_implementation!r} "
            "(flash-attention kernels take only block-causal masks). Set `attn_implementation: sdpa`, or "
            "`pack_pairs: false`."
        )
