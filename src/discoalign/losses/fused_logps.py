"""Token log-probs straight from hidden states and the LM-head weight, with no logits tensor kept for backward.

`FusedLinearLogps` is the fused linear + log-prob of Liger's fused linear cross-entropy, written in torch: the
forward projects `chunk_size` tokens at a time through the LM head and keeps only each token's log-sum-exp; the
backward recomputes each chunk's logits and turns them into the gradient in place (softmax, minus one at the
target, times the incoming gradient), then into the hidden-state and weight gradients. So at most one chunk of
logits (and one of its gradient, the same buffer) is alive at any time, and no autograd graph is built over it.

`losses.logps.sequence_logps` uses it for a plain LM head, and activation checkpointing of each chunk otherwise;
both give the plain full log-softmax's numbers (tests/test_fused_logps.py, float64; tests/test_logps.py).
benchmarks/logps_memory.py compares their time and peak memory at a real vocabulary.
"""

from __future__ import annotations

import torch


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Logits of a chunk in fp32 (float64 stays float64), soft-capped when `cap` is set."""
    logits = hidden @ weight.t()
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return logits if cap is None else torch.tanh(logits / cap) * cap


class FusedLinearLogps(torch.autograd.Function):
    """hidden (M, H), weight (V, H), targets (M,) long -> (M,) log p(target | hidden) under softmax(W h), in fp32
    (float64 for float64 inputs)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size: int, cap: float | None):
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        out = torch.empty(hidden.shape[0], dtype=dtype, device=hidden.device)
        lse = torch.empty_like(out)
        for start in range(0, hidden.shape[0], chunk_size):
            stop = start + chunk_size
            logits = _chunk_logits(hidden[start:stop], weight, cap)
            lse[start:stop] = torch.logsumexp(logits, dim=-1)
            out[start:stop] = logits.gather(-1, targets[start:stop, None]).squeeze(-1) - lse[start:stop]
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk_size, ctx.cap = chunk_size, cap
        # Backward runs outside the caller's autocast: recompute the logits under the same one as forward did.
        device = hidden.device.type
        enabled = torch.is_autocast_enabled(device)
        ctx.autocast = (device, torch.get_autocast_dtype(device) if enabled else None, enabled)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        device, dtype, enabled = ctx.autocast
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            return FusedLinearLogps._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        hidden, weight, targets, lse = ctx.saved_tensors
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        acc = torch.promote_types(weight.dtype, torch.float32)
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_weight else None
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            stop = start + ctx.chunk_size
            h, g = hidden[start:stop], grad_out[start:stop].to(lse.dtype)
            capped = _chunk_logits(h, weight, ctx.cap)
            # d out / d logit_v = 1[v = target] - softmax_v; times the incoming gradient, in place.
            if ctx.cap is None:
                grad = capped.sub_(lse[start:stop, None]).exp_()
            else:
                grad = (capped - lse[start:stop, None]).exp()
            grad.mul_(-g[:, None]).scatter_add_(-1, targets[start:stop, None], g[:, None])
            if ctx.cap is not None:  # through cap * tanh(z / cap): times 1 - tanh^2
                grad.mul_(1 - (capped / ctx.cap) ** 2)
            grad = grad.to(hidden.dtype)
            if want_hidden:
                grad_hidden[start:stop] = grad @ weight
            if want_weight:
                grad_weight.addmm_(grad.t().to(acc), h.to(acc))
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None


def fused_token_logps(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int, cap: float | None = None
) -> torch.Tensor:
    """(M, H) hidden states, the (V, H) LM-head weight, (M,) targets -> (M,) fp32 token log-probs (see module)."""
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32) + 0 * weight.sum()
    return FusedLinearLogps.apply(hidden, weight, targets, chunk_size, cap)
