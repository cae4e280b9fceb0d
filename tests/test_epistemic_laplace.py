"""`epistemic: laplace`: the posterior against exact Bayesian linear regression, the curvature weights against
autograd, the evidence's lambda against a known prior, shift invariance, save / load, and an end-to-end tiny RM run
whose `score` and `bon` read it."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import yaml
from helpers import TINY_RM

from discoalign.cli.main import main
from discoalign.errors import CheckpointError
from discoalign.models.checkpoint import has_epistemic, load_epistemic
from discoalign.models.epistemic import EpistemicInputs, LaplacePosterior
from discoalign.models.epistemic.laplace import curvature, evidence_precision, fisher_weights

LAPLACE_RM = {**TINY_RM, "epistemic": "laplace"}


def _pairs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, d, generator=g, dtype=torch.float64) + 3.0  # a shared offset: centring must not care


def test_gaussian_toy_equals_exact_bayesian_linear_regression():
    """With a Gaussian likelihood (weight 1 / noise^2 per pair) the Laplace posterior is exact: it must equal the
    conditioning formula of Bayesian linear regression (Woodbury form, computed independently) to 1e-5."""
    n, d, lam, noise = 40, 6, 0.7, 0.5
    feats = _pairs(n, d)
    D = feats[:, 0] - feats[:, 1]
    post = LaplacePosterior.from_pairs(feats, torch.full((n,), 1 / noise**2), torch.zeros(d), prior_precision=lam)
    prior = torch.eye(d, dtype=torch.float64) / lam
    gram = D @ prior @ D.T + noise**2 * torch.eye(n, dtype=torch.float64)
    exact = prior - prior @ D.T @ torch.linalg.solve(gram, D @ prior)
    assert torch.allclose(post.covariance, exact, atol=1e-5, rtol=1e-5)
    # u^2 is the predictive variance of w . (e - e_bar) under that posterior
    e = torch.randn(5, d, dtype=torch.float64)
    z = e - feats.reshape(-1, d).mean(0)
    expected = torch.einsum("bi,ij,bj->b", z, exact, z)
    got = post.variance(EpistemicInputs(torch.zeros(5, 1), torch.ones(5, 1), e.float()))
    assert torch.allclose(got.double(), expected, rtol=1e-4)


def test_logistic_weights_are_the_bt_hessian_and_probit_weights_the_fisher():
    g = torch.Generator().manual_seed(1)
    n, d = 30, 4
    D = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(d, generator=g, dtype=torch.float64)
    y = (torch.rand(n, generator=g) < 0.7).double()

    def nll(v: torch.Tensor) -> torch.Tensor:
        m = D @ v
        return -(y * torch.nn.functional.logsigmoid(m) + (1 - y) * torch.nn.functional.logsigmoid(-m)).sum()

    hessian = torch.autograd.functional.hessian(nll, w)
    assert torch.allclose(curvature(D, fisher_weights(D @ w)), hessian, atol=1e-10)
    # Probit: the Fisher information of Bernoulli(Phi(m / s)) about m, E_y[(d/dm log p(y))^2], by autograd
    s2 = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    m = (D @ w).clone().requires_grad_(True)
    log_p1 = torch.special.log_ndtr(m / s2.sqrt())
    log_p0 = torch.special.log_ndtr(-m / s2.sqrt())
    (g1,) = torch.autograd.grad(log_p1.sum(), m)
    (g0,) = torch.autograd.grad(log_p0.sum(), m)
    p1 = log_p1.detach().exp()
    fisher = p1 * g1**2 + (1 - p1) * g0**2
    assert torch.allclose(fisher_weights(D @ w, s2), fisher, rtol=1e-10)


def _map_logistic(D: torch.Tensor, y: torch.Tensor, steps: int = 30) -> torch.Tensor:
    w = torch.zeros(D.shape[1], dtype=torch.float64)
    for _ in range(steps):  # Newton, no prior (what reward-model training does)
        p = torch.sigmoid(D @ w)
        w = w + torch.linalg.solve(curvature(D, p * (1 - p)), D.T @ (y - p))
    return w


@pytest.mark.parametrize("prior_precision", [1.0, 16.0])
def test_evidence_recovers_a_known_prior_scale(prior_precision):
    g = torch.Generator().manual_seed(2)
    n, d = 4000, 32
    w_true = torch.randn(d, generator=g, dtype=torch.float64) / math.sqrt(prior_precision)
    D = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = (torch.rand(n, generator=g, dtype=torch.float64) < torch.sigmoid(D @ w_true)).double()
    w = _map_logistic(D, y)
    p = torch.sigmoid(D @ w)
    lam, _ = evidence_precision(curvature(D, p * (1 - p)), w)
    assert prior_precision / 2 < lam < prior_precision * 2


def test_a_constant_feature_shift_carries_no_uncertainty():
    n, d = 50, 5
    feats = _pairs(n, d, seed=3)
    weights = torch.rand(n, dtype=torch.float64) * 0.25
    head = torch.randn(d, dtype=torch.float64)
    shift = torch.tensor([5.0, -2.0, 0.0, 9.0, 1.0], dtype=torch.float64)
    a = LaplacePosterior.from_pairs(feats, weights, head)
    b = LaplacePosterior.from_pairs(feats + shift, weights, head)
    assert a.prior_precision == b.prior_precision
    e = torch.randn(7, d, dtype=torch.float64)
    ones = torch.ones(7, 1)
    ua = a.variance(EpistemicInputs(ones, ones, e.float()))
    ub = b.variance(EpistemicInputs(ones, ones, (e + shift).float()))
    assert torch.allclose(ua, ub, rtol=1e-4)
    # the training mean itself has no epistemic variance; uncentred it would have a large one
    assert float(a.variance(EpistemicInputs(ones[:1], ones[:1], a.feature_mean[None].float()))) < 1e-8
    mean = a.feature_mean
    assert float(mean @ a.covariance @ mean) > 1.0


def test_save_load_roundtrip_and_bad_file(tmp_path):
    post = LaplacePosterior.from_pairs(_pairs(20, 4), torch.full((20,), 0.2), torch.ones(4), link="probit")
    post.save(str(tmp_path))
    loaded = LaplacePosterior.load(str(tmp_path / "epistemic.safetensors"), post.config())
    assert torch.equal(loaded.covariance, post.covariance) and torch.equal(loaded.feature_mean, post.feature_mean)
    assert loaded.config() == post.config() and loaded.link == "probit"
    with pytest.raises(CheckpointError, match="wrong shape"):
        LaplacePosterior.load(str(tmp_path / "epistemic.safetensors"), {**post.config(), "hidden_size": 5})
    with pytest.raises(CheckpointError, match="Cannot read"):
        LaplacePosterior.load(str(tmp_path / "epistemic.safetensors"), {"kind": "laplace"})


@pytest.mark.parametrize("disco", [False, True])
def test_rm_with_laplace_is_fitted_saved_and_read_by_score_and_bon(tmp_path, disco):
    config = tmp_path / "rm.yaml"
    extra = {"add_disco_head": True, "disco_pref": True} if disco else {}
    config.write_text(yaml.safe_dump({**LAPLACE_RM, **extra}))
    out = tmp_path / "rm"
    assert main(["train", str(config), f"output_dir={out}"]) == 0
    settings = json.load(open(os.path.join(out, "heads_config.json")))["epistemic"]
    assert settings["kind"] == "laplace" and settings["link"] == ("probit" if disco else "logistic")
    assert settings["num_pairs"] == 32 and settings["prior_precision"] > 0 and has_epistemic(str(out))
    term = load_epistemic(str(out))
    assert isinstance(term, LaplacePosterior) and term.covariance.shape[0] == settings["hidden_size"]

    texts = ["bright calm gentle", "cold", "warm kind brave zqxj vwpk", "dull slow"]
    rows = [{"prompt": "Topic: food. Describe a cake.", "response": t} for t in texts]
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    scored = tmp_path / "s.jsonl"
    assert main(["score", "--model", str(out), "--data", str(data), "--out", str(scored)]) == 0
    scores = [json.loads(x) for x in scored.read_text().splitlines()]
    assert all(s["epistemic_variance"] > 0 for s in scores)
    for s in scores:  # total = aleatoric (Disco) + epistemic
        assert s["variance"] == pytest.approx(s.get("aleatoric_variance", 0.0) + s["epistemic_variance"], rel=1e-5)
    best_path = tmp_path / "best.jsonl"
    args = ["bon", "--model", str(out), "--candidates", str(data), "--kappa", "2", "--out", str(best_path)]
    assert main(args) == 0
    best = json.loads(best_path.read_text().splitlines()[0])
    objective = [s["mean"] - 2 * s["variance"] ** 0.5 for s in scores]
    assert best["response"] == texts[max(range(4), key=lambda i: objective[i])]
    assert best["objective"] == pytest.approx(max(objective), abs=1e-5)


def test_ppo_reward_model_reads_the_laplace_term_by_hand(tmp_path):
    from discoalign.config.schema import FinetuningArguments, ModelArguments
    from discoalign.models.reward_model import load_reward_model, score_responses_detailed
    from discoalign.models.tiny import build_tiny_tokenizer

    config = tmp_path / "rm.yaml"
    config.write_text(yaml.safe_dump(LAPLACE_RM))
    out = str(tmp_path / "rm")
    assert main(["train", str(config), f"output_dir={out}"]) == 0
    ft = FinetuningArguments(stage="ppo", reward_model=out, disco_risk_coef=1.0)
    rm = load_reward_model(ModelArguments(model_name_or_path="builtin:tiny-qwen2"), ft, build_tiny_tokenizer())
    assert isinstance(rm.epistemic, LaplacePosterior)
    q, r = torch.tensor([[5, 6, 7], [5, 6, 8]]), torch.tensor([[900, 901, 2], [30, 31, 2]])
    scores = score_responses_detailed(rm, q, torch.ones_like(q), r, torch.ones_like(r))
    features = rm.score_detailed(torch.cat([q, r], 1), torch.ones(2, 6, dtype=torch.long), with_features=True).features
    z = features.double() - rm.epistemic.feature_mean
    by_hand = torch.einsum("bi,ij,bj->b", z, rm.epistemic.covariance, z)
    assert torch.allclose(scores.epistemic.double(), by_hand, rtol=1e-5) and torch.equal(
        scores.variance, scores.epistemic
    )
