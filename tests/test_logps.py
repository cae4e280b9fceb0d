"""`sequence_logps`: chunked, checkpointed response log-probs equal the naive full log-softmax, values and grads."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from discoalign.losses.logps import response_lengths, sequence_logps

N, T, H, V = 3, 9, 16, 50


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, T, H, generator=g)
    head = nn.Linear(H, V, bias=True)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=g))
        head.bias.copy_(torch.randn(V, generator=g))
    labels = torch.randint(0, V, (N, T), generator=g)
    labels[0, :4] = -100  # prompt
    labels[1, :2] = -100
    labels[1, 7:] = -100  # padding
    labels[2, :8] = -100  # one response token
    return hidden, head, labels


def _naive(hidden, head, labels, softcap=None):
    logits = head(hidden).float()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    logp = logits[:, :-1].log_softmax(-1)
    target = labels[:, 1:]
    mask = target != -100
    picked = torch.gather(logp, -1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1)


@pytest.mark.parametrize("chunk_size", [1, 3, 512])
def test_values_and_gradients_match_naive(chunk_size):
    hidden, head, labels = _inputs()
    h1 = hidden.clone().requires_grad_(True)
    ours = sequence_logps(h1, head, labels, chunk_size=chunk_size)
    (ours * torch.tensor([1.0, -2.0, 0.5])).sum().backward()
    g_hidden, g_weight, g_bias = h1.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone()
    head.zero_grad()

    h2 = hidden.clone().requires_grad_(True)
    naive = _naive(h2, head, labels)
    (naive * torch.tensor([1.0, -2.0, 0.5])).sum().backward()

    assert ours.dtype == torch.float32 and ours.shape == (N,)
    assert torch.allclose(ours, naive, atol=1e-5, rtol=0)
    assert torch.allclose(g_hidden, h2.grad, atol=1e-5)
    assert torch.allclose(g_weight, head.weight.grad, atol=1e-5)
    assert torch.allclose(g_bias, head.bias.grad, atol=1e-5)


def test_softcapping_matches_naive():
    hidden, head, labels = _inputs(1)
    with torch.no_grad():
        ours = sequence_logps(hidden, head, labels, 4, final_logit_softcapping=3.0)
        assert torch.allclose(ours, _naive(hidden, head, labels, 3.0), atol=1e-5)


class _RecordingHead(nn.Module):
    """Wraps an LM head and records how many rows each call projects."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.rows: list[int] = []

    def forward(self, x):
        self.rows.append(x.reshape(-1, x.shape[-1]).shape[0])
        return self.inner(x)


def test_never_projects_more_than_a_chunk_forward_or_backward():
    hidden, head, labels = _inputs()
    rec = _RecordingHead(head)
    h = hidden.clone().requires_grad_(True)
    sequence_logps(h, rec, labels, chunk_size=2).sum().backward()
    n_scored = int((labels[:, 1:] != -100).sum())
    assert max(rec.rows) <= 2
    # forward once and recomputed once in backward: every scored token projected exactly twice, nothing else
    assert sum(rec.rows) == 2 * n_scored


def test_bf16_hidden_gives_fp32_result():
    hidden, head, labels = _inputs()
    head = head.to(torch.bfloat16)
    out = sequence_logps(hidden.to(torch.bfloat16), head, labels)
    assert out.dtype == torch.float32


def test_response_lengths():
    _, _, labels = _inputs()
    assert response_lengths(labels).tolist() == [5, 5, 1]


def test_shape_mismatch_raises():
    hidden, head, labels = _inputs()
    with pytest.raises(ValueError, match="disagree"):
        sequence_logps(hidden, head, labels[:, :-1])
