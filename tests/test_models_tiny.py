"""The built-in tiny models and tokenizer: shapes, special tokens, determinism, offline save/load."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from discoalign.models.tiny import (
    CHAT_TEMPLATE,
    TINY_ARCHS,
    build_tiny_model,
    write_tiny_model,
)


def test_tokenizer_special_tokens_and_padding(tokenizer):
    assert 1000 <= len(tokenizer) <= 2000
    assert tokenizer.pad_token == tokenizer.bos_token == tokenizer.unk_token == "<|endoftext|>"
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") != tokenizer.unk_token_id
    assert tokenizer.padding_side == "right"
    assert tokenizer.chat_template == CHAT_TEMPLATE
    # Special tokens are single ids, never split.
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        assert len(tokenizer(special, add_special_tokens=False)["input_ids"]) == 1
    # No BOS/EOS is added silently: the chat template alone decides the framing.
    assert tokenizer("hello")["input_ids"] == tokenizer("hello", add_special_tokens=False)["input_ids"]


def test_chat_template_is_chatml(tokenizer):
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("text", ["Héllo wörld, 日本語 ✓ 🙂", "  spaces\tand\nnewlines  ", "12345 + 3.14 = ?", ""])
def test_any_utf8_round_trips(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer.unk_token_id not in ids or "<|endoftext|>" in text


def test_synthetic_words_are_single_tokens(tokenizer):
    synthetic = pytest.importorskip("discoalign.data.synthetic")
    for word in synthetic.VOCABULARY:
        assert len(tokenizer(" " + word, add_special_tokens=False)["input_ids"]) == 1, word


def test_tokenizer_is_deterministic_across_processes(tokenizer):
    code = (
        "from discoalign.models.tiny import build_tiny_tokenizer as b; "
        "t = b(); print(t('The quick brown fox, 2024!')['input_ids'])"
    )
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == str(tokenizer("The quick brown fox, 2024!")["input_ids"])


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_model_config(tokenizer, arch):
    model = build_tiny_model(arch, tokenizer)
    cfg = model.config
    assert cfg.hidden_size == 64 and cfg.num_hidden_layers == 2 and cfg.num_attention_heads == 4
    assert cfg.vocab_size == len(tokenizer)
    assert (cfg.pad_token_id, cfg.eos_token_id, cfg.bos_token_id) == (
        tokenizer.pad_token_id,
        tokenizer.eos_token_id,
        tokenizer.bos_token_id,
    )
    if arch == "gpt2":
        assert cfg.n_inner == 128 and cfg.n_positions == 512
    else:
        assert cfg.intermediate_size == 128 and cfg.max_position_embeddings == 512 and cfg.num_key_value_heads == 2
    assert next(model.parameters()).dtype == torch.float32
    logits = model(torch.tensor([tokenizer("hello world")["input_ids"]])).logits
    assert logits.shape[-1] == len(tokenizer) and torch.isfinite(logits).all()


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_model_is_deterministic_and_leaves_global_rng_alone(tokenizer, arch):
    torch.manual_seed(1234)
    state = torch.random.get_rng_state()
    a = build_tiny_model(arch, tokenizer, seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = build_tiny_model(arch, tokenizer, seed=0)
    c = build_tiny_model(arch, tokenizer, seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_unknown_arch_is_rejected(tokenizer):
    with pytest.raises(ValueError, match="llama, qwen2, qwen3, gpt2"):
        build_tiny_model("mamba", tokenizer)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_written_model_loads_offline_with_auto_classes(tiny_dirs, tokenizer, arch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_dirs[arch]
    assert os.path.isfile(os.path.join(path, "model.safetensors"))
    assert json.load(open(os.path.join(path, "config.json")))["vocab_size"] == len(tokenizer)
    loaded = AutoModelForCausalLM.from_pretrained(path)
    built = build_tiny_model(arch, tokenizer).state_dict()
    assert all(torch.equal(v, built[k]) for k, v in loaded.state_dict().items())
    loaded_tok = AutoTokenizer.from_pretrained(path)
    # qwen2 comes back as Qwen2Tokenizer, rebuilt from vocab + merges: the ids must still be identical.
    text = "<|im_start|>user\nIn 2024, I'm    here: ünïcödé 日本語!<|im_end|>\n"
    assert loaded_tok(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert (loaded_tok.pad_token, loaded_tok.eos_token) == (tokenizer.pad_token, tokenizer.eos_token)
    assert loaded_tok.chat_template == CHAT_TEMPLATE
    assert loaded_tok.padding_side == "right"


def test_write_returns_dir(tmp_path):
    out = str(tmp_path / "m")
    assert write_tiny_model("qwen3", out) == out
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(out))
