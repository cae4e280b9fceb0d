"""Summed response log-probabilities computed from hidden states, a chunk of tokens at a time.

A full fp32 log-softmax over batch x length x vocab is the largest tensor of a DPO step (2 x 4 x 1024 x 152k
floats is 5 GB). Here only response positions are projected through the LM head, in chunks, and each chunk
is recomputed in the backward pass, so at most one chunk of logits is alive at a time, forward or backward.
A plain `nn.Linear` head on one process goes through the fused linear + log-prob (`losses.fused_logps`: no
autograd graph over the logits, the gradient formed in place; 23% faster and 39% less peak memory than the
checkpointed chunks at a 49k vocabulary, docs/performance.md); any other head (wrapped, hooked, biased, or
gathered by ZeRO-3 / FSDP through its module call) through activation checkpointing of each chunk.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .fused_logps import fused_token_logps

IGNORE_INDEX = -100
DEFAULT_CHUNK_SIZE = 512


def softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Gemma-style final logit soft-capping `cap * tanh(logits / cap)`; identity when `cap` is None."""
    return logits if cap is None else torch.tanh(logits / cap) * cap


def _token_logps(
    hidden: torch.Tensor, targets: torch.Tensor, lm_head: nn.Module, final_logit_softcapping: float | None
) -> torch.Tensor:
    """hidden: (M, H), targets: (M,) -> (M,) fp32 log p(target | hidden)."""
    logits = lm_head(hidden).float()
    logits = softcap(logits, final_logit_softcapping)
    picked = torch.gather(logits, -1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def _fusable(lm_head: nn.Module) -> bool:
    """Whether the head's weight may be read directly (`fused_token_logps`) instead of through a module call: a plain
    bias-free `nn.Linear` with no hooks (accelerate's device-map hooks, a recorder), on one process (ZeRO-3 and FSDP
    gather a weight only around its module's call)."""
    return (
        type(lm_head) is nn.Linear
        and lm_head.bias is None
        and not (lm_head._forward_hooks or lm_head._forward_pre_hooks or hasattr(lm_head, "_hf_hook"))
        and not hasattr(lm_head.weight, "ds_id")
        and not (torch.distributed.is_available() and torch.distributed.is_initialized())
    )


def sequence_logps(
    hidden: torch.Tensor,
    lm_head: nn.Module,
    labels: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    final_logit_softcapping: float | None = None,
) -> torch.Tensor:
    """Sum of next-token log-probs over positions whose label is not -100.

    Position t's hidden state predicts label t + 1 (the usual causal shift), so ``labels[:, 0]`` is never
    scored. Logits are computed in fp32 for at most ``chunk_size`` response tokens at a time.

    Args:
        hidden: (N, T, H) last hidden states of the backbone, any float dtype.
        lm_head: the output embedding (``(.., H) -> (.., V)``).
        labels: (N, T) long, token ids on response positions and -100 elsewhere.
        chunk_size: number of scored tokens projected through the LM head at once.
        final_logit_softcapping: the config's logit soft-cap (Gemma 2), or None.

    Returns:
        (N,) fp32: per-row sum of log p(label_{t+1} | x_{<=t}); 0 for a row with no scored token.
    """
    if hidden.shape[:2] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} disagree on (N, T)")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    shifted_labels = labels[:, 1:]
    mask = shifted_labels != IGNORE_INDEX
    rows = mask.nonzero(as_tuple=True)[0]
    scored_hidden = hidden[:, :-1][mask]  # (M, H)
    targets = shifted_labels[mask]  # (M,)

    # Recompute each chunk in backward only when a gradient is actually needed.
    recompute = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in lm_head.parameters()))
    out = torch.zeros(labels.shape[0], dtype=torch.float32, device=hidden.device)
    if recompute and targets.shape[0] > 0 and _fusable(lm_head):
        token_logps = fused_token_logps(scored_hidden, lm_head.weight, targets, chunk_size, final_logit_softcapping)
        return out.index_add(0, rows, token_logps.float())
    pieces = []
    for start in range(0, targets.shape[0], chunk_size):
        h = scored_hidden[start : start + chunk_size]
        t = targets[start : start + chunk_size]
        if recompute:
            pieces.append(checkpoint(_token_logps, h, t, lm_head, final_logit_softcapping, use_reentrant=False))
        else:
            pieces.append(_token_logps(h, t, lm_head, final_logit_softcapping))
    token_logps = torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)
    # index_add keeps the result connected to the graph even when no token is scored.
    return out.index_add(0, rows, token_logps)


def response_lengths(labels: torch.Tensor) -> torch.Tensor:
    """labels: (N, T) -> (N,) long, the number of scored (next-token) positions of each row."""
    return (labels[:, 1:] != IGNORE_INDEX).sum(dim=-1)


def full_sequence_logps(
    hidden: torch.Tensor, lm_head: nn.Module, labels: torch.Tensor, final_logit_softcapping: float | None = None
) -> torch.Tensor:
    """The plain path `sequence_logps` replaces: one fp32 log-softmax over every position, (N, T, V) at once.

    Kept for `logps_chunk_size: 0`, to compare against (same arguments and result as `sequence_logps`).
    """
    if hidden.shape[:2] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} disagree on (N, T)")
    logits = lm_head(hidden[:, :-1]).float()
    logits = softcap(logits, final_logit_softcapping)
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    picked = torch.gather(logits.log_softmax(-1), -1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1)


def pair_sequence_logps(
    hidden: torch.Tensor,
    lm_head: nn.Module,
    labels: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    final_logit_softcapping: float | None = None,
) -> torch.Tensor:
    """Summed response log-probs of a pairwise batch in either layout: (2B,) fp32, chosen first.

    Args:
        hidden: (2B, T, H) for the plain layout (one row per sequence), or (B, T, H) for packed pairs
            (`data.packing`: both responses of a pair in one row).
        labels: (2B, T) long in both layouts; with packed pairs row b scores pair b's chosen tokens and row B+b
            its rejected tokens, both read from hidden row b.
        chunk_size: tokens per LM-head chunk (see `sequence_logps`); 0 takes the plain full log-softmax.
    """

    def logps(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if chunk_size == 0:
            return full_sequence_logps(h, lm_head, y, final_logit_softcapping)
        return sequence_logps(h, lm_head, y, chunk_size, final_logit_softcapping)

    if labels.shape[0] == hidden.shape[0]:
        return logps(hidden, labels)
    if labels.shape[0] != 2 * hidden.shape[0]:
        raise ValueError(f"labels {tuple(labels.shape)} fit neither layout of hidden {tuple(hidden.shape)}")
    batch = hidden.shape[0]
    return torch.cat([logps(hidden, labels[:batch]), logps(hidden, labels[batch:])])
