"""Stage sft: loss parity with transformers' causal-LM loss, packing, prompt masking, data, config, end to end."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import log_history

from discoalign.config import build_config
from discoalign.config.schema import DataArguments, FinetuningArguments, ModelArguments
from discoalign.data import get_dataset
from discoalign.data.sft import SFTCollator, encode_sft, to_sft_rows
from discoalign.errors import ConfigError, DataError
from discoalign.models.loader import load_model_with_heads
from discoalign.train.sft import sft_loss

ALPACA = [
    {"instruction": "Name a colour.", "input": "", "output": "Blue is a colour."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Say hello in French, politely and at some length please.", "input": "", "output": "Bonjour !"},
]


def _write(path, rows):
    path.write_text(json.dumps(rows))
    return str(path)


@pytest.fixture(scope="module")
def qwen3(tiny_dirs):
    model, tokenizer = load_model_with_heads(
        ModelArguments(model_name_or_path=tiny_dirs["qwen3"]), FinetuningArguments(stage="sft"), add_value_head=False
    )
    return model, tokenizer


def _batch(tokenizer, rows, packing=False):
    encoded = [encode_sft(tokenizer, r, 128) for fmt_row in rows for r in to_sft_rows(fmt_row, "prompt")]
    return encoded, SFTCollator(tokenizer.pad_token_id, packing=packing)(encoded)


def test_prompt_is_masked_and_the_response_ends_with_eos(qwen3):
    _, tokenizer = qwen3
    encoded, batch = _batch(tokenizer, ALPACA)
    for i, row in enumerate(encoded):
        p, r = len(row["prompt_input_ids"]), len(row["response_input_ids"])
        assert (batch["labels"][i, :p] == -100).all()
        assert batch["labels"][i, p : p + r].tolist() == row["response_input_ids"]
        assert (batch["labels"][i, p + r :] == -100).all()
        assert tokenizer.eos_token_id in row["response_input_ids"]
        assert tokenizer.decode(row["response_input_ids"], skip_special_tokens=True).strip() == ALPACA[i]["output"]
    # alpaca's `input` follows the instruction
    assert "2 and 3" in tokenizer.decode(encoded[1]["prompt_input_ids"])


@pytest.mark.parametrize("chunk_size", [0, 3, 512])
def test_loss_equals_transformers_causal_lm_loss(qwen3, chunk_size):
    model, tokenizer = qwen3
    _, batch = _batch(tokenizer, ALPACA)
    with torch.no_grad():
        ours, tokens = sft_loss(model, batch, chunk_size)
        theirs = model.causal_lm(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
        ).loss
    assert int(tokens) == int((batch["labels"][:, 1:] != -100).sum())
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-5)
    # and by hand: mean over scored tokens of -log softmax(logits[t-1])[label t]
    logits = model.causal_lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.detach()
    logp = logits[:, :-1].log_softmax(-1)
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    by_hand = -(logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask).sum() / mask.sum()
    assert ours.item() == pytest.approx(by_hand.item(), abs=1e-5)


def test_packing_gives_the_padded_loss_and_gradients(qwen3):
    model, tokenizer = qwen3
    _, padded = _batch(tokenizer, ALPACA)
    _, packed = _batch(tokenizer, ALPACA, packing=True)
    assert packed["input_ids"].shape[0] == 1
    assert packed["input_ids"].shape[1] == int(padded["attention_mask"].sum())  # no padding at all
    losses, grads = [], []
    for batch in (padded, packed):
        model.zero_grad()
        loss, _ = sft_loss(model, batch, 512)
        loss.backward()
        losses.append(loss.item())
        grads.append(model.causal_lm.model.layers[0].self_attn.q_proj.weight.grad.clone())
    model.zero_grad()
    assert losses[1] == pytest.approx(losses[0], abs=1e-5)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-4)


def test_data_sources_for_sft(tmp_path, qwen3):
    _, tokenizer = qwen3
    pairs = [{"prompt": "Pick one.", "chosen": "Good answer.", "rejected": "Bad answer."}] * 3
    pairwise = _write(tmp_path / "pairs.json", pairs)
    for responses, count in (("chosen", 3), ("both", 6)):
        rows = get_dataset(DataArguments(dataset=pairwise, sft_responses=responses), tokenizer, "sft").train
        assert len(rows) == count
    texts = [tokenizer.decode(r, skip_special_tokens=True).strip() for r in rows["response_input_ids"]]
    assert texts.count("Good answer.") == 3 and texts.count("Bad answer.") == 3

    messages = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]}]
    rows = get_dataset(DataArguments(dataset=_write(tmp_path / "m.json", messages)), tokenizer, "sft").train
    assert tokenizer.decode(rows[0]["response_input_ids"], skip_special_tokens=True).strip() == "Hello there"
    sharegpt = [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hey"},
                                   {"from": "human", "value": "Bye?"}, {"from": "gpt", "value": "Bye!"}]}]  # fmt: skip
    row = get_dataset(DataArguments(dataset=_write(tmp_path / "s.json", sharegpt)), tokenizer, "sft").train[0]
    assert [m["content"] for m in row["prompt"]] == ["Hi", "Hey", "Bye?"]  # earlier turns are the prompt
    assert tokenizer.decode(row["response_input_ids"], skip_special_tokens=True).strip() == "Bye!"


def test_bad_sft_rows_name_the_row(tmp_path, qwen3):
    _, tokenizer = qwen3
    rows = [dict(ALPACA[0]), {"instruction": "No answer here.", "input": ""}]
    path = _write(tmp_path / "bad.json", rows)
    with pytest.raises(DataError, match=r"row 1 \(0-based\), field `output`"):
        get_dataset(DataArguments(dataset=path), tokenizer, "sft")
    kept = get_dataset(DataArguments(dataset=path, skip_invalid_rows=True), tokenizer, "sft")
    assert len(kept.train) == 1
    convo = [{"messages": [{"role": "user", "content": "Hi"}]}]
    with pytest.raises(DataError, match="ending with an assistant turn"):
        get_dataset(DataArguments(dataset=_write(tmp_path / "c.json", convo)), tokenizer, "sft")


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"stage": "sft", "add_disco_head": True}, "cannot be used with `stage: sft`"),
        ({"stage": "rm", "packing": True}, "`packing` applies to `stage: sft` only"),
        ({"stage": "dpo", "sft_responses": "both"}, "`sft_responses` applies to `stage: sft` only"),
        ({"stage": "sft", "pack_pairs": True}, "use `packing: true`"),
        ({"stage": "sft", "packing": True, "attn_implementation": "flash_attention_2"}, "sdpa or eager"),
    ],
)
def test_config_rules(raw, message):
    with pytest.raises(ConfigError, match=message):
        build_config(dict(raw, dataset="builtin:synthetic"))


def test_cli_bad_sft_config_exits_2(tmp_path, capsys):
    from discoalign.cli.main import main

    config = tmp_path / "c.yaml"
    config.write_text("stage: sft\ndataset: builtin:synthetic\nadd_beta_head: true\n")
    assert main(["train", str(config)]) == 2
    assert "stage: sft" in capsys.readouterr().err


@pytest.mark.parametrize("finetuning_type", ["full", "lora"])
def test_sft_trains_and_its_output_loads_as_a_policy(tmp_path, finetuning_type):
    from discoalign.train.tuner import run_exp

    out = str(tmp_path / "sft")
    raw = dict(stage="sft", model_name_or_path="builtin:tiny-qwen3", dataset="builtin:synthetic",
               synthetic_num_pairs=96, eval_dataset="builtin:synthetic", max_samples=32, cutoff_len=48,
               per_device_train_batch_size=16, max_steps=12, finetuning_type=finetuning_type,
               learning_rate=3e-3 if finetuning_type == "full" else 3e-2, lora_rank=16,
               output_dir=out, save_strategy="no", do_train=True, do_eval=True, eval_on_start=True, packing=True,
               disable_tqdm=True, plot_loss=False, logging_steps=4)  # fmt: skip
    results = run_exp(build_config(raw))
    history = log_history(out)
    start = next(h["eval_loss"] for h in history if "eval_loss" in h)
    # it learned the responses (LoRA of rank 16 on a random 2-layer model learns slower)
    assert results["eval"]["eval_loss"] < start - (0.5 if finetuning_type == "full" else 0.2)
    assert results["eval"]["eval_perplexity"] == pytest.approx(torch.tensor(results["eval"]["eval_loss"]).exp().item())
    # the output is a checkpoint a later stage loads as its model
    policy, _ = load_model_with_heads(ModelArguments(model_name_or_path=out), FinetuningArguments(),
                                      add_value_head=True)  # fmt: skip
    assert policy.value_head is not None


def test_alpaca_shared_file(shared_data, qwen3):
    _, tokenizer = qwen3
    data = DataArguments(dataset=str(shared_data / "alpaca_en_demo.json"), max_samples=50, cutoff_len=256)
    rows = get_dataset(data, tokenizer, "sft").train
    assert len(rows) == 50
    assert all(len(p) + len(r) <= 256 for p, r in zip(rows["prompt_input_ids"], rows["response_input_ids"]))


def test_gradient_accumulation_equals_one_large_batch(tmp_path):
    """The loss is divided by the token count of all accumulated micro-batches, as transformers' own causal-LM loss:
    2 x 2 accumulated rows give the update of 4 rows at once, although the micro-batches hold different token counts."""
    from safetensors.torch import load_file

    from discoalign.train.tuner import run_exp

    rows = [{"instruction": f"Question {i}", "output": "word " * (1 + 5 * (i % 4))} for i in range(8)]
    data = _write(tmp_path / "sft.json", rows)
    weights = []
    for batch, accumulation in ((4, 1), (2, 2)):
        out = str(tmp_path / f"b{batch}")
        run_exp(build_config(dict(stage="sft", model_name_or_path="builtin:tiny-qwen3", dataset=data, cutoff_len=64,
                                  per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                                  max_steps=1, optim="sgd", learning_rate=1.0, lr_scheduler_type="constant",
                                  max_grad_norm=0.0, output_dir=out, save_strategy="no", plot_loss=False,
                                  disable_tqdm=True, do_train=True)))  # fmt: skip
        weights.append(load_file(f"{out}/model.safetensors"))
    base = load_model_with_heads(ModelArguments(), FinetuningArguments(stage="sft"), add_value_head=False)[0]
    start = base.causal_lm.state_dict()
    moved = 0.0
    for key, value in weights[0].items():
        torch.testing.assert_close(weights[1][key], value, atol=2e-6, rtol=0)
        moved = max(moved, (value - start[key]).abs().max().item())
    assert moved > 1e-3  # the step did change the weights


def test_resume_from_checkpoint_ends_where_the_uninterrupted_run_ends(tmp_path, capsys):
    from safetensors.torch import load_file

    from discoalign.cli.main import main

    config = tmp_path / "sft.yaml"
    config.write_text(
        "stage: sft\nmodel_name_or_path: builtin:tiny-qwen3\ndataset: builtin:synthetic\nsynthetic_num_pairs: 64\n"
        "cutoff_len: 48\nper_device_train_batch_size: 8\nmax_steps: 4\nlearning_rate: 3.0e-3\nsave_strategy: steps\n"
        "save_steps: 2\nplot_loss: false\ndisable_tqdm: true\nseed: 3\n"
    )
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(["train", str(config), f"output_dir={full}"]) == 0
    assert main(["train", str(config), f"output_dir={part}",
                 f"resume_from_checkpoint={full / 'checkpoint-2'}"]) == 0  # fmt: skip
    a, b = load_file(full / "model.safetensors"), load_file(part / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0)
    # `discoalign eval` of the result: loss and perplexity on the data
    assert main(["eval", str(config), f"model_name_or_path={full}", f"output_dir={tmp_path / 'eval'}"]) == 0
    metrics = json.load(open(tmp_path / "eval" / "eval_results.json"))
    assert metrics["eval_perplexity"] == pytest.approx(torch.tensor(metrics["eval_loss"]).exp().item())
