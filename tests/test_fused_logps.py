"""`losses.fused_logps.FusedLinearLogps` against the plain full log-softmax, in float64: values and the gradients of
the hidden states and of the LM-head weight, with and without a soft-cap, over several chunk sizes."""

from __future__ import annotations

import pytest
import torch

from discoalign.losses.fused_logps import fused_token_logps
from discoalign.losses.logps import softcap


def plain(hidden, weight, targets, cap):
    logits = softcap(hidden @ weight.t(), cap)
    return logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)


def inputs(m=37, h=16, v=101, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(m, h, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, v, (m,), generator=g)
    upstream = torch.randn(m, generator=g, dtype=torch.float64)
    return hidden, weight, targets, upstream


@pytest.mark.parametrize("cap", [None, 3.0])
@pytest.mark.parametrize("chunk", [1, 8, 37, 512])
def test_fused_equals_plain_float64(chunk, cap):
    hidden, weight, targets, upstream = inputs()
    want = plain(hidden, weight, targets, cap)
    want_grads = torch.autograd.grad((want * upstream).sum(), (hidden, weight))
    got = fused_token_logps(hidden, weight, targets, chunk, cap)
    assert got.dtype == torch.float64
    got_grads = torch.autograd.grad((got * upstream).sum(), (hidden, weight))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)


def test_gradcheck():
    hidden, weight, targets, _ = inputs(m=5, h=3, v=7)
    assert torch.autograd.gradcheck(lambda h, w: fused_token_logps(h, w, targets, 2, 2.0), (hidden, weight))


def test_frozen_weight_gets_no_gradient_and_fp32_out_of_bf16():
    hidden, weight, targets, _ = inputs()
    h = hidden.detach().float().requires_grad_(True)
    w = weight.detach().float()  # a frozen LM head (LoRA)
    out = fused_token_logps(h, w, targets, 8)
    out.sum().backward()
    assert h.grad is not None and w.grad is None
    torch.testing.assert_close(out, plain(h, w, targets, None), rtol=0, atol=1e-5)
    out_bf16 = fused_token_logps(h.detach().bfloat16(), w.bfloat16(), targets, 8)
    assert out_bf16.dtype == torch.float32


def test_backward_recomputes_under_forward_autocast():
    """Under CPU bf16 autocast the gradient is the one of the logits forward computed (bf16 matmul), as with
    activation checkpointing, not of fp32 logits recomputed outside autocast."""
    hidden, weight, targets, upstream = inputs()
    h0, w0 = hidden.detach().float(), weight.detach().float()
    grads = []
    for fused in (True, False):
        h, w = h0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if fused:
                out = fused_token_logps(h, w, targets, 8)
            else:
                out = (h @ w.t()).float().log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
        (out * upstream.float()).sum().backward()
        grads.append((h.grad, w.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
