"""The epistemic term (`epistemic: token_novelty`): counts by hand, saved / loaded / scored alike, total variance in
PPO, and decoupling (off: today's BT run bit for bit). Also RM accuracy with ties (TRL drops them)."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
import yaml
from helpers import TINY_RM
from safetensors.torch import load_file

from discoalign.cli.main import main
from discoalign.config.schema import FinetuningArguments, ModelArguments
from discoalign.models.checkpoint import load_epistemic
from discoalign.models.epistemic import EpistemicInputs, TokenNovelty
from discoalign.train.rm.metric import pair_accuracy, reward_metrics

TINY_BT = {**TINY_RM, "eval_dataset": "builtin:synthetic"}


def test_token_novelty_counts_by_hand():
    term = TokenNovelty(vocab_size=16, buckets=64, prior_variance=0.5).fit([[1, 2, 3], [4]])
    ids = torch.tensor([[1, 2, 3, 0], [1, 3, 9, 0], [4, 4, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 0, 0]])
    # row 1: token 9 unseen; pairs (1,3) and (3,9) unseen. row 2: pair (4,4) unseen. Padding never counts.
    assert term.novelty(ids, mask).tolist() == [0.0, 3.0, 1.0]
    assert term.variance(EpistemicInputs(ids, mask)).tolist() == [0.0, 1.5, 0.5]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("epi")
    out = {}
    for kind in ("none", "token_novelty"):
        config = root / f"{kind}.yaml"
        config.write_text(yaml.safe_dump({**TINY_BT, "epistemic": kind}))
        assert main(["train", str(config), f"output_dir={root / kind}"]) == 0
        out[kind] = str(root / kind)
    return root, out


def test_epistemic_off_is_todays_bt_bit_for_bit(runs):
    _, out = runs
    off, on = (
        load_file(os.path.join(out["none"], "heads.safetensors")),
        load_file(os.path.join(out["token_novelty"], "heads.safetensors")),
    )
    assert off.keys() == on.keys() and all(torch.equal(off[k], on[k]) for k in off)
    a, b = (load_file(os.path.join(out[k], "model.safetensors")) for k in ("none", "token_novelty"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    ev_off, ev_on = (json.load(open(os.path.join(out[k], "eval_results.json"))) for k in ("none", "token_novelty"))
    for key in ("eval_loss", "eval_accuracy", "eval_nll"):
        assert ev_off[key] == ev_on[key]
    config_off = json.load(open(os.path.join(out["none"], "heads_config.json")))
    assert "epistemic" not in config_off and not os.path.exists(os.path.join(out["none"], "epistemic.safetensors"))
    assert config_off["value_head_kind"] == "reward"


def test_epistemic_saved_loaded_and_scored(runs, tmp_path):
    _, out = runs
    path = out["token_novelty"]
    config = json.load(open(os.path.join(path, "heads_config.json")))["epistemic"]
    assert config["kind"] == "token_novelty" and config["prior_variance"] > 0
    term = load_epistemic(path)
    assert term.prior_variance == config["prior_variance"] and int(term.unigram.sum()) > 0

    rows = [{"prompt": "Topic: food. Describe a cake.", "response": r} for r in ("calm", "zqxj vwpk calm")]
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    scores = {}
    for kind in ("none", "token_novelty"):
        assert main(["score", "--model", out[kind], "--data", str(data), "--out", str(tmp_path / f"{kind}.jsonl")]) == 0
        scores[kind] = [json.loads(x) for x in open(tmp_path / f"{kind}.jsonl")]
    assert [set(l) & {"variance", "sigma"} for l in scores["none"]] == [set(), set()]
    for plain, with_epi in zip(scores["none"], scores["token_novelty"]):
        assert with_epi["mean"] == plain["mean"]  # the term never moves the mean
        assert with_epi["variance"] == with_epi["epistemic_variance"]  # no Disco head: total = epistemic
        assert with_epi["sigma"] == pytest.approx(math.sqrt(with_epi["variance"]))
    # by hand: prior variance x (unseen tokens + unseen adjacent pairs) of the training-tokenised response
    from discoalign.eval.score import encode_prompt_response, load_reward_model_for_scoring

    _, tok = load_reward_model_for_scoring(path, False)
    for row, line in zip(rows, scores["token_novelty"]):
        _, ids = encode_prompt_response(tok, [{"role": "user", "content": row["prompt"]}],
                                        [{"role": "assistant", "content": row["response"]}], 1024)  # fmt: skip
        t = torch.tensor([ids])
        expected = term.prior_variance * float(term.novelty(t, torch.ones_like(t))[0])
        assert line["epistemic_variance"] == pytest.approx(expected, rel=1e-6)
    assert scores["token_novelty"][1]["epistemic_variance"] > scores["token_novelty"][0]["epistemic_variance"]


def test_ppo_reward_model_uses_total_sigma(runs):
    from discoalign.models.loader import load_model_with_heads
    from discoalign.models.reward_model import load_reward_model, score_responses_detailed

    _, out = runs
    _, tok = load_model_with_heads(ModelArguments(model_name_or_path="builtin:tiny-qwen2"),
                                   FinetuningArguments(stage="ppo", reward_model=out["token_novelty"]),
                                   add_value_head=False, is_trainable=False)  # fmt: skip
    ft = FinetuningArguments(stage="ppo", reward_model=out["token_novelty"], disco_risk_coef=1.0)
    rm = load_reward_model(ModelArguments(model_name_or_path="builtin:tiny-qwen2"), ft, tok)
    assert rm.epistemic is not None and rm.variance_head is None
    q = torch.tensor([[5, 6, 7]])
    r = torch.tensor([[900, 901, 2]])
    scores = score_responses_detailed(rm, q, torch.ones_like(q), r, torch.ones_like(r))
    assert scores.aleatoric is None and torch.equal(scores.variance, scores.epistemic) and scores.variance[0] > 0
    from discoalign.errors import ConfigError

    with pytest.raises(ConfigError, match="no variance head, no epistemic term"):
        load_reward_model(
            ModelArguments(model_name_or_path="builtin:tiny-qwen2"),
            FinetuningArguments(stage="ppo", reward_model=out["none"], disco_risk_coef=1.0),
            tok,
        )


def test_rm_accuracy_drops_ties_like_trl():
    preds = np.array([[1.0, 0.0, np.nan, np.nan], [0.5, 0.5, np.nan, np.nan], [0.0, 1.0, np.nan, np.nan],
                      [2.0, 1.0, np.nan, np.nan]])  # fmt: skip
    assert reward_metrics(preds, None, disco=False)["accuracy"] == pytest.approx(2 / 3)
    assert math.isnan(pair_accuracy(np.array([1.0]), np.array([1.0])))
    assert pair_accuracy(np.array([1.0, 2.0, 3.0]), np.array([0.0, 2.0, 4.0]), np.array([True, True, True])) == 0.5


def test_epistemic_key_is_for_stage_rm_only():
    from discoalign.config import build_config
    from discoalign.errors import ConfigError

    with pytest.raises(ConfigError, match="`epistemic: token_novelty` is a property of a reward model"):
        build_config({"stage": "dpo", "dataset": "builtin:synthetic", "epistemic": "token_novelty"})
    with pytest.raises(ConfigError, match="epistemic"):
        build_config({"stage": "rm", "dataset": "builtin:synthetic", "epistemic": "bogus"})


def test_token_novelty_save_load_roundtrip_and_bad_file(tmp_path):
    from discoalign.errors import CheckpointError

    term = TokenNovelty(vocab_size=32, buckets=128, prior_variance=0.7).fit([[1, 2, 3, 4], [5, 6, 1, 2]])
    term.save(str(tmp_path))
    loaded = TokenNovelty.load(str(tmp_path / "epistemic.safetensors"), term.config())
    assert torch.equal(loaded.unigram, term.unigram) and torch.equal(loaded.bigram, term.bigram)
    ids = torch.tensor([[1, 2, 9, 4, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    assert torch.equal(loaded.variance(EpistemicInputs(ids, mask)), term.variance(EpistemicInputs(ids, mask)))
    with pytest.raises(CheckpointError, match="wrong shape"):
        TokenNovelty.load(str(tmp_path / "epistemic.safetensors"), {**term.config(), "buckets": 64})
