"""Issue 24: a LlamaFactory user's YAML runs as it is where the meaning is the same.

LlamaFactory's own example files (tests/fixtures/llamafactory, model swapped for builtin:tiny-qwen3 and `use_cpu`
added) train through `discoalign train` in a folder laid out as LlamaFactory's (`data/dataset_info.json`, read
without `dataset_dir`), and the one notice names exactly the keys read differently. Runs are cut to one step of
8 rows on the command line (the files themselves are unchanged).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from discoalign.cli.main import main
from discoalign.config import build_config
from discoalign.errors import ConfigError

FIXTURES = Path(__file__).parent / "fixtures" / "llamafactory"
SHORT = ["max_steps=1", "max_samples=8"]  # one optimizer step of 8 rows (gradient_accumulation_steps: 8)
# What the notice must list for every example on this CPU machine: the same keys in all four files.
EXPECTED_NOTICE = {"overwrite_cache", "preprocessing_num_workers", "warmup_ratio", "bf16", "cutoff_len"}
# PPO: prompt + response within the 512 positions (`max_new_tokens: 512` in the file), halves of it each.
EXPECTED_NOTICE_PPO = EXPECTED_NOTICE | {"max_new_tokens"}


def notice_keys(text: str) -> set[str]:
    """The keys of the run's notice: the lines `  - `key: value` -> ...` under "keys of ... read differently"."""
    block = text.split("read differently from their literal meaning", 1)
    assert len(block) == 2, f"no notice in:\n{text}"
    assert text.count("read differently from their literal meaning") == 1  # one notice
    return set(re.findall(r"^  - `([a-z_0-9]+): ", block[1], flags=re.M))


@pytest.fixture(scope="module")
def llamafactory_dir(tmp_path_factory, shared_data):
    """A working folder laid out like a LlamaFactory checkout: the example YAMLs and `data/` with its registry."""
    root = tmp_path_factory.mktemp("llamafactory")
    for path in FIXTURES.glob("*.yaml"):
        shutil.copy(path, root / path.name)
    shutil.copytree(FIXTURES / "data", root / "data")
    for name in ("alpaca_en_demo.json", "dpo_en_demo.json"):
        os.symlink(shared_data / name, root / "data" / name)
    return root


@pytest.fixture(scope="module")
def example_runs(llamafactory_dir):
    """Run the four examples in LlamaFactory's order (the PPO one reads the reward model's output); per example:
    (exit code, everything logged)."""
    import logging

    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = Keep(level=logging.INFO)
    ours = logging.getLogger("discoalign")
    ours.addHandler(handler)
    level = ours.level
    ours.setLevel(logging.INFO)
    cwd = os.getcwd()
    os.chdir(llamafactory_dir)
    results = {}
    try:
        for stage in ("sft", "reward", "dpo", "ppo"):
            records.clear()
            code = main(["train", f"llama3_lora_{stage}.yaml", *SHORT])
            results[stage] = (code, "\n".join(r.getMessage() for r in records))
    finally:
        os.chdir(cwd)
        ours.removeHandler(handler)
        ours.setLevel(level)
    return results


@pytest.mark.parametrize("stage", ["sft", "reward", "dpo", "ppo"])
def test_llamafactory_example_trains_with_one_notice(example_runs, llamafactory_dir, stage):
    code, logged = example_runs[stage]
    assert code == 0, logged
    assert notice_keys(logged) == (EXPECTED_NOTICE_PPO if stage == "ppo" else EXPECTED_NOTICE)
    out = llamafactory_dir / "saves" / "llama3-8b" / "lora" / stage
    saved = yaml.safe_load((out / "discoalign_config.yaml").read_text())
    # What each mapped key became: the ratio as transformers 5 takes it, fp32, the model's 512 positions.
    assert saved["warmup_steps"] == 0.1 and saved["bf16"] is False
    assert saved["cutoff_len"] == (256 if stage == "ppo" else 512)
    assert stage != "ppo" or saved["max_new_tokens"] == 256
    assert saved["template"] == "llama3" and saved["finetuning_type"] == "lora"
    assert not {"warmup_ratio", "overwrite_cache", "preprocessing_num_workers"} & set(saved)
    # `dataset: dpo_en_demo` / `identity,alpaca_en_demo` came from data/dataset_info.json (no `dataset_dir` set).
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 1
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|eot_id|>"  # llama3's turn end, as LlamaFactory's replace_eos
    assert "<|start_header_id|>" in (out / "chat_template.jinja").read_text()


def test_sft_example_read_both_registry_entries(llamafactory_dir, example_runs):
    assert example_runs["sft"][0] == 0
    # `identity,alpaca_en_demo` with max_samples 8: 8 rows of each entry.
    assert "Data: 16 training rows" in example_runs["sft"][1]


def test_the_notice_only_lists_what_the_user_wrote(tmp_path, caplog):
    """A plain discoalign config has no notice; `bf16` on a machine with no GPU for it falls back with a line."""
    from discoalign.config.compat import notice

    cfg = build_config({"stage": "rm", "dataset": "builtin:synthetic", "output_dir": str(tmp_path)})
    assert cfg.key_notes == [] and notice(cfg.key_notes, cfg.source) is None
    import transformers.utils

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(transformers.utils, "is_torch_bf16_gpu_available", lambda: False)
        cfg = build_config({"stage": "rm", "dataset": "builtin:synthetic", "output_dir": str(tmp_path), "bf16": True})
    assert cfg.training.bf16 is False and [n.key for n in cfg.key_notes] == ["bf16"]
    assert "no GPU that runs bf16" in cfg.key_notes[0].why


def test_warmup_ratio_is_what_transformers_5_takes(tmp_path):
    cfg = build_config(
        {"stage": "rm", "dataset": "builtin:synthetic", "warmup_ratio": 0.1, "output_dir": str(tmp_path)}
    )
    assert cfg.training.warmup_steps == 0.1 and cfg.training.get_warmup_steps(95) == 10  # ceil(9.5)
    with pytest.raises(ConfigError, match="`warmup_ratio` and `warmup_steps` mean the same thing"):
        build_config({"stage": "rm", "warmup_ratio": 0.1, "warmup_steps": 3})


def test_every_key_that_cannot_be_used_is_in_one_error(tmp_path, capsys):
    """Four bad keys, one from the command line: one paragraph names all four, and blames the override on the
    command line, not on the YAML file."""
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"stage": "rm", "dataset": "builtin:synthetic", "max_prompt_length": 512,
                                      "logging_dir": "logs", "pref_bta": 0.2}))  # fmt: skip
    code = main(["train", str(config), "learning_rat=1e-4"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("discoalign: error:") == 1 and len(err.strip().splitlines()) == 1
    assert "run.yaml' and the command line (`learning_rat`) cannot be used" in err and "4 keys in '" in err
    for key in ("`max_prompt_length`", "`logging_dir`", "`pref_bta`. Did you mean `pref_beta`?",
                "`learning_rat`. Did you mean `learning_rate`?"):  # fmt: skip
        assert key in err, err
    code = main(["train", str(FIXTURES / "llama3_lora_dpo.yaml"), "pref_betta=0.2"])
    err = capsys.readouterr().err
    assert code == 2 and "1 key in the command line cannot be used: unknown key `pref_betta`" in err


# ---- chat templates by name ------------------------------------------------------------------------------

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}]  # fmt: skip
# LlamaFactory's slots (data/template.py) for these messages, written out by hand; `{B}` / `{E}`: bos / eos.
LLAMAFACTORY_RENDERINGS = {
    "llama3": "{B}<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    "Hello<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "qwen": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    "Hello<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n",
    "mistral": "{B}[INST] Be brief.\n\nHi[/INST] Hello{E}[INST] Bye[/INST]",
    "gemma": "{B}<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n"
    "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n",
    "default": "System: Be brief.{E}\nHuman: Hi{E}\nAssistant:Hello{E}\nHuman: Bye{E}\nAssistant:",
}


@pytest.mark.parametrize("name", sorted(LLAMAFACTORY_RENDERINGS))
def test_named_template_renders_as_llamafactory(name):
    from discoalign.models.tiny import build_tiny_tokenizer
    from discoalign.models.vocabulary import apply_template

    tok = build_tiny_tokenizer()
    apply_template(tok, name)
    expected = LLAMAFACTORY_RENDERINGS[name].replace("{B}", tok.bos_token).replace("{E}", tok.eos_token)
    assert tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == expected
    for marker in re.findall(r"<[|a-z_]+>", expected):  # every marker is one token, never split into pieces
        assert len(tok(marker, add_special_tokens=False)["input_ids"]) == 1, marker


def test_qwen_template_has_its_default_system_and_names_match_the_config():
    from discoalign.config.schema import CHAT_TEMPLATE_NAMES
    from discoalign.data.chat_templates import TEMPLATES
    from discoalign.models.tiny import build_tiny_tokenizer
    from discoalign.models.vocabulary import apply_template

    assert set(TEMPLATES) == set(CHAT_TEMPLATE_NAMES)
    tok = build_tiny_tokenizer()
    apply_template(tok, "qwen")
    text = tok.apply_chat_template(MESSAGES[1:2], tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")


def test_a_template_s_new_tokens_get_embeddings_at_the_mean(tmp_path):
    """`template: llama3` on a tokenizer without its markers: 3 tokens added, the embeddings grow by 3 rows, each
    the mean of the old rows (deterministic, so an adapter reloads onto the same base)."""
    from discoalign.config.schema import FinetuningArguments, ModelArguments
    from discoalign.models.loader import load_model_with_heads
    from discoalign.models.tiny import build_tiny_model

    model, tok = load_model_with_heads(ModelArguments(model_name_or_path="builtin:tiny-llama", template="llama3"),
                                       FinetuningArguments(stage="sft"), is_trainable=False)  # fmt: skip
    plain = build_tiny_model("llama").get_input_embeddings().weight
    grown = model.backbone.get_input_embeddings().weight
    assert len(tok) == plain.shape[0] + 3 == grown.shape[0]
    assert torch.equal(grown[: plain.shape[0]], plain)
    assert torch.allclose(grown[-3:], plain.mean(0).expand(3, -1))
    assert tok.eos_token == "<|eot_id|>"


# ---- cutoff_len against the model's positions --------------------------------------------------------------


def test_cutoff_len_above_the_model_s_positions_is_clamped(tmp_path, caplog):
    """builtin:tiny-gpt2 has 512 learned positions; `cutoff_len: 2048` with rows longer than that used to fail
    with `IndexError: index out of range in self`. It is clamped to 512, with a line in the notice."""
    long = " ".join(f"word{i % 50}" for i in range(700))
    rows = [{"prompt": f"{long} question {i}", "chosen": "yes indeed", "rejected": "no"} for i in range(4)]
    data = tmp_path / "long.json"
    data.write_text(json.dumps(rows))
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"stage": "rm", "model_name_or_path": "builtin:tiny-gpt2", "dataset": str(data),
                                      "cutoff_len": 2048, "max_steps": 1, "per_device_train_batch_size": 2,
                                      "output_dir": str(tmp_path / "out"), "save_strategy": "no", "plot_loss": False,
                                      "use_cpu": True}))  # fmt: skip
    assert main(["train", str(config)]) == 0
    assert notice_keys(caplog.text) == {"cutoff_len"}
    assert (
        "`cutoff_len: 2048` -> `cutoff_len: 512`: the model reads at most 512 positions (`n_positions`" in caplog.text
    )
    saved = yaml.safe_load((tmp_path / "out" / "discoalign_config.yaml").read_text())
    assert saved["cutoff_len"] == 512


# ---- adapter_name_or_path ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sft_adapter(tmp_path_factory):
    """A LoRA adapter on builtin:tiny-qwen3 with non-zero weights (as if trained), saved as a checkpoint."""
    from discoalign.config.schema import FinetuningArguments, ModelArguments
    from discoalign.models.checkpoint import save_checkpoint
    from discoalign.models.loader import load_model_with_heads

    out = str(tmp_path_factory.mktemp("adapter") / "sft")
    model, tok = load_model_with_heads(ModelArguments(model_name_or_path="builtin:tiny-qwen3"),
                                       FinetuningArguments(stage="sft", finetuning_type="lora", lora_rank=4))  # fmt: skip
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.backbone.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    save_checkpoint(model, out, tokenizer=tok)
    return out, {n: p.detach().clone() for n, p in model.backbone.named_parameters() if "lora_" in n}


def _policy(adapter: str, **keys):
    from discoalign.config.schema import FinetuningArguments, ModelArguments
    from discoalign.models.loader import load_model_with_heads

    model_args = ModelArguments(model_name_or_path="builtin:tiny-qwen3", adapter_name_or_path=adapter)
    return load_model_with_heads(model_args, FinetuningArguments(stage="dpo", **keys))[0]


def test_adapter_is_trained_further_with_lora(sft_adapter):
    adapter, saved = sft_adapter
    model = _policy(adapter, finetuning_type="lora", lora_rank=4)
    lora = {n: p for n, p in model.backbone.named_parameters() if "lora_" in n}
    assert lora.keys() == saved.keys() and all(torch.equal(lora[n], saved[n]) for n in saved)
    assert all(p.requires_grad for p in lora.values())  # the adapter trains further
    assert not any(p.requires_grad for n, p in model.backbone.named_parameters() if "lora_" not in n)


def test_adapter_is_merged_for_full_and_for_a_new_adapter(sft_adapter):
    from peft import PeftModel

    from discoalign.models.tiny import build_tiny_model

    adapter, _ = sft_adapter
    merged = PeftModel.from_pretrained(build_tiny_model("qwen3"), adapter).merge_and_unload().state_dict()
    full = _policy(adapter, finetuning_type="full").backbone.state_dict()
    assert merged.keys() == full.keys() and all(torch.equal(merged[k], full[k]) for k in merged)
    fresh = _policy(adapter, finetuning_type="lora", lora_rank=4, create_new_adapter=True).backbone
    base = fresh.get_base_model().state_dict()
    assert all(torch.equal(v, merged[k.replace(".base_layer", "")]) for k, v in base.items() if "lora_" not in k)
    assert all(torch.count_nonzero(p) == 0 for n, p in fresh.named_parameters() if "lora_B" in n)  # a new adapter


def test_adapter_that_is_not_one_fails_before_any_model_loads(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"stage": "dpo", "dataset": "builtin:synthetic", "finetuning_type": "lora",
                                      "adapter_name_or_path": str(tmp_path)}))  # fmt: skip
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "`adapter_name_or_path`" in err and "not a LoRA adapter folder" in err
