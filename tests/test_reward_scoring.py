"""Reward read where it was trained (PPO, `score`, best-of-n), `discoalign score` on prompt + response rows and
every variance layout, refusal of folders without a trained reward head, `--skip-invalid-rows`, and `bon`."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from discoalign.cli.main import main
from discoalign.config.schema import FinetuningArguments, ModelArguments
from discoalign.data.position import append_turn_suffix, turn_end_suffix
from discoalign.data.prompts import left_pad
from discoalign.models.checkpoint import save_checkpoint
from discoalign.models.heads import VARIANCE_FLOOR
from discoalign.models.loader import load_model_with_heads
from discoalign.models.reward_model import score_responses

# A template whose assistant turn ends on the EOS itself (nothing after it), unlike ChatML's `<|im_end|>\n`.
EOS_END_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_end|>' }}{% else %}{{ '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
PROMPT = "Topic: food. Describe a cake."
RESPONSE = "bright calm gentle"


def _reward_dir(root, tiny_dirs, template: str | None = None, disco: bool = False, name: str = "rm") -> str:
    """A random tiny reward model saved as a `stage: rm` output (heads_config says value_head_kind: reward)."""
    model, tok = load_model_with_heads(
        ModelArguments(model_name_or_path=tiny_dirs["qwen2"]), FinetuningArguments(stage="rm", add_disco_head=disco),
        add_value_head=True, is_trainable=False,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.no_grad():
        model.value_head.summary.weight.normal_(0, 0.3)
        if disco:
            model.variance_head.summary.weight.normal_(0, 0.3)
    if template is not None:
        tok.chat_template = template
    model.heads_config["value_head_kind"] = "reward"
    return save_checkpoint(model, str(root / name), tokenizer=tok)


def _load(path: str, disco: bool = False):
    return load_model_with_heads(
        ModelArguments(model_name_or_path=path), FinetuningArguments(stage="rm", add_disco_head=disco),
        add_value_head=True, is_trainable=False,
    )  # fmt: skip


def test_turn_end_suffix_chatml_eos_end_and_fallback(tiny_dirs):
    _, tok = _load(tiny_dirs["qwen2"])
    assert turn_end_suffix(tok) == tok("\n")["input_ids"]  # ChatML: `<|im_end|>` then `\n`
    tok.chat_template = EOS_END_TEMPLATE
    assert turn_end_suffix(tok) == []
    tok.chat_template = None  # fallback template: EOS is appended to the response, nothing after it
    assert turn_end_suffix(tok) == []


def test_append_turn_suffix_only_after_ended_rows():
    ids = torch.tensor([[5, 2, 0], [6, 7, 8]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    out_ids, out_mask = append_turn_suffix(ids, mask, torch.tensor([True, False]), [9, 10], pad_token_id=0)
    assert out_ids.tolist() == [[5, 2, 9, 10, 0], [6, 7, 8, 0, 0]]
    assert out_mask.tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]]


@pytest.mark.parametrize("template", ["chatml", "eos_end"])
def test_ppo_reward_equals_score_on_the_same_text(tmp_path, tiny_dirs, template):
    path = _reward_dir(tmp_path, tiny_dirs, None if template == "chatml" else EOS_END_TEMPLATE, disco=True)
    model, tok = _load(path, disco=True)
    data = tmp_path / "cands.jsonl"
    data.write_text(json.dumps({"prompt": PROMPT, "response": RESPONSE}) + "\n")
    out = tmp_path / "scores.jsonl"
    assert main(["score", "--model", path, "--data", str(data), "--out", str(out)]) == 0
    line = json.loads(out.read_text())
    # What PPO sees: the generation prompt, then the sampled tokens up to and including the EOS.
    prompt_ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True)["input_ids"]
    sampled = tok(RESPONSE)["input_ids"] + [tok.eos_token_id]
    q_ids, q_mask = left_pad([[tok.pad_token_id] * 2 + prompt_ids], tok.pad_token_id)  # extra left padding
    q_mask[0, :2] = 0
    r_ids = torch.tensor([sampled + [tok.pad_token_id] * 3])
    r_mask = torch.tensor([[1] * len(sampled) + [0] * 3])
    suffix = turn_end_suffix(tok)
    mean, var = score_responses(model, q_ids, q_mask, r_ids, r_mask, torch.tensor([True]), suffix, tok.pad_token_id)
    assert line["mean"] == pytest.approx(mean.item(), abs=1e-5)
    assert line["variance"] == pytest.approx(var.item(), abs=1e-5)
    # Scored at the EOS instead (what PPO did before), the ChatML reward is another number.
    at_eos, _ = score_responses(model, q_ids, q_mask, r_ids, r_mask)
    if template == "chatml":
        assert suffix and abs(at_eos.item() - line["mean"]) > 1e-4
    else:
        assert suffix == [] and at_eos.item() == pytest.approx(line["mean"], abs=1e-5)


def test_score_prompt_response_rows_alpaca_and_messages(tmp_path, tiny_dirs):
    path = _reward_dir(tmp_path, tiny_dirs)
    rows = [
        {"prompt": PROMPT, "response": RESPONSE, "id": "a"},
        {"instruction": "Describe a cake.", "input": "", "output": "warm kind"},
        {"messages": [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": RESPONSE}]},
    ]
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "s.jsonl"
    assert main(["score", "--model", path, "--data", str(data), "--out", str(out)]) == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [l["index"] for l in lines] == [0, 1, 2] and lines[0]["id"] == "a"
    assert "variance" not in lines[0]  # a BT model reports the mean only
    assert lines[0]["mean"] == pytest.approx(lines[2]["mean"], abs=1e-6)  # same conversation, two layouts
    # the mean is the value head at the last token of the training tokenisation (ChatML `...<|im_end|>\n`)
    model, tok = _load(path)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": RESPONSE}], tokenize=True
    )["input_ids"]
    assert tok.decode(ids[-2:]) == "<|im_end|>\n"
    t = torch.tensor([ids])
    assert lines[0]["mean"] == pytest.approx(model.score(t, torch.ones_like(t))[0].item(), abs=1e-5)


def test_score_reads_discorm_fork_variance(tmp_path, tiny_dirs):
    path = shutil.copytree(tiny_dirs["qwen2"], str(tmp_path / "fork"))
    gen = torch.Generator().manual_seed(3)
    heads = {
        "v_head.summary.weight": torch.randn(1, 64, generator=gen) * 0.05, "v_head.summary.bias": torch.randn(1),
        "var_head.var.weight": torch.randn(1, 64, generator=gen) * 0.05, "var_head.var.bias": torch.randn(1),
    }  # fmt: skip
    save_file(heads, os.path.join(path, "value_head.safetensors"))
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": PROMPT, "chosen": RESPONSE, "rejected": "cold"}) + "\n")
    out = tmp_path / "s.jsonl"
    assert main(["score", "--model", path, "--data", str(data), "--out", str(out)]) == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    model, tok = _load(path, disco=False)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": RESPONSE}], tokenize=True
    )["input_ids"]
    with torch.no_grad():
        h = model.hidden_states(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))[0, -1]
    raw = h @ heads["var_head.var.weight"][0] + heads["var_head.var.bias"][0]
    assert lines[0]["aleatoric_variance"] == pytest.approx(float(F.softplus(raw) + VARIANCE_FLOOR), abs=1e-5)
    assert lines[0]["variance"] == lines[0]["aleatoric_variance"] and lines[0]["sigma"] > 0


def test_score_refuses_folders_without_a_trained_reward_head(tmp_path, tiny_dirs, capsys):
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"prompt": PROMPT, "response": RESPONSE}) + "\n")
    # a PPO policy: its value head is a critic
    critic = _reward_dir(tmp_path, tiny_dirs, name="ppo")
    config = json.load(open(os.path.join(critic, "heads_config.json")))
    config["value_head_kind"] = "critic"
    json.dump(config, open(os.path.join(critic, "heads_config.json"), "w"))
    # a DPO policy: no value head
    model, tok = load_model_with_heads(
        ModelArguments(model_name_or_path=tiny_dirs["qwen2"]),
        FinetuningArguments(stage="dpo"),
        add_value_head=False,
        is_trainable=False,
    )
    dpo = save_checkpoint(model, str(tmp_path / "dpo"), tokenizer=tok)
    for folder, words in ((critic, "critic"), (dpo, "no reward head"), (tiny_dirs["qwen2"], "no reward head")):
        assert main(["score", "--model", folder, "--data", str(data), "--out", str(tmp_path / "x.jsonl")]) == 2
        err = capsys.readouterr().err
        assert words in err and folder in err and "Traceback" not in err
    # PPO's `reward_model:` refuses the critic too
    from discoalign.errors import CheckpointError
    from discoalign.models.reward_model import load_reward_model

    with pytest.raises(CheckpointError, match="critic"):
        load_reward_model(ModelArguments(model_name_or_path=tiny_dirs["qwen2"]),
                          FinetuningArguments(stage="ppo", reward_model=critic), tok)  # fmt: skip


def test_score_skip_invalid_rows_counts(tmp_path, tiny_dirs, capsys):
    path = _reward_dir(tmp_path, tiny_dirs)
    pairs = tmp_path / "hh.jsonl"
    rows = [
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello there", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away"},
        {"chosen": "\n\nHuman: Hi\n\nAssistant:", "rejected": "\n\nHuman: Hi\n\nAssistant: No"},  # empty response
        {"chosen": "\n\nHuman: Yo\n\nAssistant: Fine", "rejected": "\n\nHuman: Yo\n\nAssistant: Bad"},
    ]
    pairs.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "s.jsonl"
    assert main(["score", "--model", path, "--data", str(pairs), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "row 1" in err and "Traceback" not in err
    assert main(["score", "--model", path, "--data", str(pairs), "--out", str(out), "--skip-invalid-rows"]) == 0
    printed = capsys.readouterr().out
    assert "skipped 1 of 3 rows: 1 empty response" in printed
    assert len(out.read_text().splitlines()) == 4
    cands = tmp_path / "c.jsonl"
    cands.write_text(
        "\n".join(json.dumps(r) for r in [{"prompt": PROMPT, "response": " "}, {"prompt": PROMPT, "response": "ok"}])
    )
    assert main(["score", "--model", path, "--data", str(cands), "--out", str(out), "--skip-invalid-rows"]) == 0
    assert "skipped 1 of 2 rows: 1 empty response" in capsys.readouterr().out


def test_bon_reranks_a_candidate_file_by_hand(tmp_path, tiny_dirs):
    path = _reward_dir(tmp_path, tiny_dirs, disco=True)
    texts = ["bright calm gentle", "cold", "warm kind brave", "dull slow"]
    rows = [{"prompt": PROMPT, "response": t} for t in texts] + [{"prompt": "Describe a pie.", "response": t}
                                                                  for t in texts[:2]]  # fmt: skip
    data = tmp_path / "cands.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    scored = tmp_path / "s.jsonl"
    assert main(["score", "--model", path, "--data", str(data), "--out", str(scored)]) == 0
    scores = [json.loads(x) for x in scored.read_text().splitlines()]
    for kappa in (0.0, 2.0):
        out = tmp_path / f"best{kappa}.jsonl"
        assert main(["bon", "--model", path, "--candidates", str(data), "--kappa", str(kappa), "--out", str(out)]) == 0
        best = [json.loads(x) for x in out.read_text().splitlines()]
        assert [b["num_candidates"] for b in best] == [4, 2]
        for group, b in zip((scores[:4], scores[4:]), best):
            objective = [s["mean"] - kappa * s["variance"] ** 0.5 for s in group]
            i = max(range(len(group)), key=lambda j: objective[j])
            assert b["response"] == group[i]["text"] and b["objective"] == pytest.approx(objective[i], abs=1e-5)
            assert [c["mean"] for c in b["candidates"]] == pytest.approx([s["mean"] for s in group], abs=1e-6)
            assert b["messages"][-1] == {"role": "assistant", "content": group[i]["text"]}


def test_bon_samples_from_a_policy(tmp_path, tiny_dirs):
    path = _reward_dir(tmp_path, tiny_dirs)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in (PROMPT, "Describe a pie.")))
    out = tmp_path / "best.jsonl"
    args = ["bon", "--model", path, "--policy", tiny_dirs["qwen2"], "--prompts", str(prompts), "--n", "3",
            "--max-new-tokens", "6", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    best = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(best) == 2 and all(b["num_candidates"] == 3 for b in best)
    for b in best:
        assert b["mean"] == max(c["mean"] for c in b["candidates"])
    assert main(args[:-2] + ["--kappa", "1", "--out", str(out)]) == 2  # a BT model has no sigma


# ---- PPO: reward position, truncated sampling, value-head dropout off ------------------------------


def test_ppo_truncated_sampling_is_taken_with_a_note(caplog):
    """`top_p` / `top_k` (LlamaFactory's PPO example sets `top_p: 0.9`): sampled truncated, log-probs of the full
    softmax, as LlamaFactory and OpenRLHF do; a note says so."""
    from discoalign.config import build_config

    for key, value in (("top_p", 0.9), ("top_k", 5)):
        caplog.clear()
        cfg = build_config({"stage": "ppo", "reward_model": "saves/rm", "dataset": "builtin:synthetic", key: value})
        assert getattr(cfg.finetuning, key) == value
        assert f"`{key}: {value}`" in caplog.text and "full softmax" in caplog.text


def test_ppo_rollout_reads_the_reward_after_the_turn_end(tmp_path, tiny_dirs):
    from discoalign.config import build_config
    from discoalign.train.ppo.workflow import build_ppo_trainer

    rm = _reward_dir(tmp_path, tiny_dirs)
    cfg = build_config({
        "stage": "ppo", "model_name_or_path": tiny_dirs["qwen2"], "reward_model": rm, "dataset": "builtin:synthetic",
        "synthetic_num_pairs": 24, "max_new_tokens": 24, "per_device_train_batch_size": 4, "ppo_buffer_size": 1,
        "max_steps": 1, "output_dir": str(tmp_path / "ppo"), "save_strategy": "no", "disable_tqdm": True,
        "head_dropout": 0.3, "seed": 0,
    })  # fmt: skip
    trainer, bundle = build_ppo_trainer(cfg)
    policy = trainer._policy()
    assert policy.value_head.dropout.p == 0.0  # head_dropout is off during PPO, like the backbone's dropout
    assert policy.heads_config["value_head_kind"] == "critic"
    model, tok = _load(rm)
    assert trainer.turn_suffix == tok("\n")["input_ids"]
    # make the policy end its responses quickly: EOS gets a large logit
    with torch.no_grad():
        policy.lm_head.weight[tok.eos_token_id] += 3.0 * policy.lm_head.weight.norm(dim=1).mean()
    rows = [bundle.train[i] for i in range(4)]
    torch.manual_seed(0)
    rollout = trainer.make_rollout(rows)
    assert rollout.ended.any()
    for i in range(4):
        prompt = rollout.query_ids[i][rollout.query_mask[i].bool()].tolist()
        response = rollout.response_ids[i][rollout.response_mask[i].bool()].tolist()
        ids = prompt + response + (trainer.turn_suffix if bool(rollout.ended[i]) else [])
        t = torch.tensor([ids])
        expected = model.score(t, torch.ones_like(t))[0].item()
        assert rollout.reward_mean[i].item() == pytest.approx(expected, abs=1e-5)
