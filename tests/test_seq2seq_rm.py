"""Encoder-decoder reward models (`builtin:tiny-t5`): the heads read the decoder's last hidden state at the last real
token (checked against transformers' own forward), padding does not change a score, `rm` trains full and LoRA, the
checkpoint reloads with the same metrics, `score` works, an unused variance head changes nothing bit for bit, and
the stages that need a causal LM refuse a seq2seq model before it loads."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from helpers import train_losses

from discoalign.cli.main import main
from discoalign.config import build_config
from discoalign.config.schema import FinetuningArguments, ModelArguments
from discoalign.models.loader import load_model_with_heads
from discoalign.models.seq2seq import shift_right
from discoalign.train.tuner import run_exp

T5 = "builtin:tiny-t5"


def _load(**ft):
    return load_model_with_heads(ModelArguments(model_name_or_path=T5), FinetuningArguments(**ft), add_value_head=True)


def test_tiny_t5_is_a_deterministic_offline_seq2seq_model():
    a, tok = _load()
    b, _ = _load()
    assert a.is_seq2seq and type(a.causal_lm).__name__ == "T5ForConditionalGeneration"
    assert a.config.hidden_size == 64 and a.config.decoder_start_token_id == tok.pad_token_id
    for (name, pa), (_, pb) in zip(a.causal_lm.named_parameters(), b.causal_lm.named_parameters()):
        assert torch.equal(pa, pb), name


def test_heads_read_the_decoder_last_hidden_state_at_the_last_real_token():
    torch.manual_seed(0)
    model, tok = _load(add_disco_head=True)
    with torch.no_grad():
        model.variance_head.summary.weight.normal_(0, 0.3)
    texts = ["Topic: art. Describe a garden. bright calm quick", "Hi rude", "the sea is wide and blue"]
    batch = tok(texts, return_tensors="pt", padding=True)  # right padding
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        mean, variance = model.score(ids, mask)
        # transformers' own seq2seq forward, with the decoder inputs built by hand (start token, then the ids).
        start = torch.full((ids.shape[0], 1), model.config.decoder_start_token_id)
        decoder_ids = torch.cat([start, ids[:, :-1]], dim=1)
        out = model.causal_lm(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids,
                              decoder_attention_mask=mask, output_hidden_states=True)  # fmt: skip
        last = out.decoder_hidden_states[-1][torch.arange(3), mask.sum(1) - 1]
        torch.testing.assert_close(mean, model.value_head(last), rtol=0, atol=1e-6)
        torch.testing.assert_close(variance, model.variance_head(last), rtol=0, atol=1e-6)
        shifted = shift_right(ids, mask, model.config.decoder_start_token_id)
        assert torch.equal(shifted[mask.bool()], decoder_ids[mask.bool()])  # padding positions are masked anyway
        # Explicit decoder inputs are used as given (and the heads read the decoder's own mask).
        m, v = model.score(ids, mask, decoder_input_ids=decoder_ids, decoder_attention_mask=mask)
        torch.testing.assert_close(m, mean, rtol=0, atol=1e-6)
        m, _ = model.score(ids, mask, decoder_input_ids=decoder_ids[:, :2], decoder_attention_mask=mask[:, :2])
        torch.testing.assert_close(m, model.value_head(out.decoder_hidden_states[-1][:, 1]), rtol=0, atol=1e-5)

        # Each row alone, and the batch left-padded, score the same.
        for i, text in enumerate(texts):
            alone = tok([text], return_tensors="pt")
            m, v = model.score(alone["input_ids"], alone["attention_mask"])
            torch.testing.assert_close(m, mean[i : i + 1], rtol=0, atol=1e-5)
            torch.testing.assert_close(v, variance[i : i + 1], rtol=0, atol=1e-5)
        tok.padding_side = "left"
        left = tok(texts, return_tensors="pt", padding=True)
        tok.padding_side = "right"
        m, v = model.score(left["input_ids"], left["attention_mask"])
        torch.testing.assert_close(m, mean, rtol=0, atol=1e-5)
    assert variance.std() > 1e-3


def rm_cfg(tmp_path, name: str, **kw):
    raw = {
        "stage": "rm", "model_name_or_path": T5, "dataset": "builtin:synthetic", "eval_dataset": "builtin:synthetic",
        "synthetic_num_pairs": 64, "cutoff_len": 48, "output_dir": str(tmp_path / name),
        "per_device_train_batch_size": 8, "per_device_eval_batch_size": 32, "max_steps": 4, "learning_rate": 2e-3,
        "logging_steps": 1, "save_strategy": "no", "seed": 7, "do_train": True, "head_dropout": 0.1,
        "num_score_samples": 0,
    }  # fmt: skip
    raw.update(kw)
    return build_config(raw)


def test_unused_variance_head_changes_nothing_bit_for_bit(tmp_path):
    from safetensors.torch import load_file

    run_exp(rm_cfg(tmp_path, "plain"))
    run_exp(rm_cfg(tmp_path, "with_head", add_disco_head=True, disco_pref=False))
    plain, with_head = train_losses(tmp_path / "plain"), train_losses(tmp_path / "with_head")
    assert len(plain) == 4 and plain == with_head
    h_plain = load_file(str(tmp_path / "plain" / "heads.safetensors"))
    h_with = load_file(str(tmp_path / "with_head" / "heads.safetensors"))
    assert torch.equal(h_plain["value_head.summary.weight"], h_with["value_head.summary.weight"])
    assert torch.count_nonzero(h_with["variance_head.summary.weight"]) == 0
    w_plain = load_file(str(tmp_path / "plain" / "model.safetensors"))
    w_with = load_file(str(tmp_path / "with_head" / "model.safetensors"))
    assert w_plain.keys() == w_with.keys() and all(torch.equal(w_plain[k], w_with[k]) for k in w_plain)


@pytest.mark.slow
@pytest.mark.parametrize("finetuning_type", ["full", "lora"])
def test_rm_trains_and_the_checkpoint_reloads_with_the_same_metrics(tmp_path, finetuning_type):
    cfg = rm_cfg(tmp_path, "train", finetuning_type=finetuning_type, lora_rank=4, max_steps=16, learning_rate=3e-3,
                 add_disco_head=True, disco_pref=True, head_dropout=0.0, do_eval=True)  # fmt: skip
    results = run_exp(cfg)
    curve = train_losses(tmp_path / "train")
    assert sum(curve[-4:]) / 4 < sum(curve[:4]) / 4, curve
    saved = tmp_path / "train"
    assert (saved / ("adapter_model.safetensors" if finetuning_type == "lora" else "model.safetensors")).is_file()
    again = run_exp(rm_cfg(tmp_path, "eval", model_name_or_path=str(saved), do_train=False, do_eval=True,
                           add_disco_head=True, disco_pref=True))  # fmt: skip
    for key in ("eval_loss", "eval_accuracy"):
        assert again["eval"][key] == pytest.approx(results["eval"][key], abs=1e-6), key


def test_score_command_on_a_t5_reward_model(tmp_path):
    torch.manual_seed(0)
    model, tok = _load(add_disco_head=True)
    from discoalign.models.checkpoint import save_checkpoint

    out = save_checkpoint(model, str(tmp_path / "rm"), tok)
    data = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "Describe a garden.", "chosen": "bright calm", "rejected": "rude"},
            {"prompt": "Hi", "chosen": "hello there, kind friend", "rejected": "go"}]  # fmt: skip
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    scores = tmp_path / "scores.jsonl"
    assert main(["score", "--model", out, "--data", str(data), "--out", str(scores)]) == 0
    lines = [json.loads(line) for line in scores.read_text().splitlines()]
    assert len(lines) == 4 and all("variance" in line for line in lines)
    reloaded, _ = load_model_with_heads(ModelArguments(model_name_or_path=out),
                                        FinetuningArguments(add_disco_head=True), add_value_head=True,
                                        is_trainable=False)  # fmt: skip
    for name, param in model.named_parameters():
        assert torch.equal(param, dict(reloaded.named_parameters())[name]), name


@pytest.mark.parametrize("overrides, words", [
    ({"stage": "dpo"}, ["encoder-decoder", "stage: dpo"]),
    ({"pack_pairs": True}, ["pack_pairs", "encoder-decoder"]),
])  # fmt: skip
def test_what_a_seq2seq_model_cannot_do_exits_2_before_loading(tmp_path, capsys, overrides, words):
    config = tmp_path / "bad.yaml"
    raw = {"stage": "rm", "model_name_or_path": T5, "dataset": "builtin:synthetic", "output_dir": str(tmp_path / "o")}
    config.write_text(yaml.safe_dump({**raw, **overrides}))
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and all(w in err for w in words), err


def test_a_t5_reward_model_scores_ppo_responses(tmp_path):
    from discoalign.models.checkpoint import save_checkpoint
    from discoalign.models.reward_model import load_reward_model, score_responses

    torch.manual_seed(0)
    model, tok = _load()
    out = save_checkpoint(model, str(tmp_path / "rm"), tok)
    ft = FinetuningArguments(stage="ppo", reward_model=out)
    reward = load_reward_model(ModelArguments(model_name_or_path="builtin:tiny-qwen3"), ft, tok)
    assert reward.is_seq2seq
    tok.padding_side = "left"  # PPO's layout: left-padded prompts, right-padded responses
    query = tok(["Describe a garden.", "Hi"], return_tensors="pt", padding=True)
    tok.padding_side = "right"
    response = tok([" bright calm", " rude words here"], return_tensors="pt", padding=True)
    mean, _ = score_responses(reward, query["input_ids"], query["attention_mask"], response["input_ids"],
                              response["attention_mask"])  # fmt: skip
    for i in range(2):
        q = query["input_ids"][i][query["attention_mask"][i].bool()]
        r = response["input_ids"][i][response["attention_mask"][i].bool()]
        ids = torch.cat([q, r])[None]
        with torch.no_grad():
            alone, _ = model.score(ids, torch.ones_like(ids))
        torch.testing.assert_close(mean[i : i + 1], alone, rtol=0, atol=1e-5)
