"""`device_map` for inference-only models (reward model, reference) on CPU, the one device this suite has: scores and
log-probs equal those of the model loaded without it, heads sit on the device of the last hidden state, the model
that trains ignores the key, and offloading / multi-process splitting are refused. Splitting over several GPUs is
not exercised here (no GPU); `last_hidden_device` is checked on a model whose final norm sits on another device."""

from __future__ import annotations

import pytest
import torch

from discoalign.config.schema import FinetuningArguments, ModelArguments
from discoalign.errors import ConfigError
from discoalign.models.loader import load_model_with_heads
from discoalign.models.quantization import last_hidden_device


def _batch(tok):
    batch = tok(["Topic: art. Describe a garden. bright calm", "Hi rude"], return_tensors="pt", padding=True)
    return batch["input_ids"], batch["attention_mask"]


def _reward_model(path: str, device_map=None, trainable: bool = False):
    torch.manual_seed(0)
    return load_model_with_heads(
        ModelArguments(model_name_or_path=path, device_map=device_map),
        FinetuningArguments(add_disco_head=True),
        add_value_head=True,
        is_trainable=trainable,
    )


@pytest.mark.parametrize("device_map", ["cpu", "auto", "sequential", "0" if torch.cuda.is_available() else "cpu"])
def test_a_device_mapped_reward_model_scores_like_the_plain_one(tiny_dirs, device_map):
    plain, tok = _reward_model(tiny_dirs["qwen3"])
    mapped, _ = _reward_model(tiny_dirs["qwen3"], device_map)
    # One device here: transformers places the whole model there (`hf_device_map` is set for split models only).
    on_gpu = torch.cuda.is_available() and device_map != "cpu"
    assert {p.device.type for p in mapped.parameters()} == {"cuda" if on_gpu else "cpu"}
    ids, mask = _batch(tok)
    with torch.no_grad():
        mean, variance = mapped.score(ids, mask)
        mean_p, variance_p = plain.score(ids, mask)
    device = last_hidden_device(mapped.decoder)
    assert mapped.value_head.summary.weight.device == device and mean.device == device
    torch.testing.assert_close(mean.cpu(), mean_p, rtol=0, atol=1e-6)
    torch.testing.assert_close(variance.cpu(), variance_p, rtol=0, atol=1e-6)


def test_a_device_mapped_reference_gives_the_same_logps(tiny_dirs):
    plain, tok = _reward_model(tiny_dirs["llama"])
    mapped, _ = _reward_model(tiny_dirs["llama"], "auto")
    ids, mask = _batch(tok)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100  # the "prompt"
    with torch.no_grad():
        a = mapped(ids, mask, with_heads=False, labels=labels).logps
        b = plain(ids, mask, with_heads=False, labels=labels).logps
    assert a.device == ids.device
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_the_model_that_trains_ignores_device_map(tiny_dirs):
    import discoalign.models.backbone as loader

    seen = []
    original = loader._from_pretrained

    def monkeypatch_kwargs(name, args, dtype, load_kwargs=None):
        seen.append(load_kwargs)
        return original(name, args, dtype, load_kwargs)

    loader._from_pretrained = monkeypatch_kwargs
    try:
        _reward_model(tiny_dirs["qwen3"], "auto", trainable=True)
        _reward_model(tiny_dirs["qwen3"], "auto", trainable=False)
    finally:
        loader._from_pretrained = original
    assert seen == [{}, {"device_map": "auto"}]


def test_heads_follow_the_last_hidden_state_to_its_device(tiny_dirs):
    # A stand-in for a model split over GPUs: the final norm (the end of the decoder) on another device.
    model, _ = _reward_model(tiny_dirs["qwen3"])
    assert last_hidden_device(model.decoder) == torch.device("cpu")
    model.decoder.norm.to("meta")
    assert last_hidden_device(model.decoder).type == "meta"
    model.place_heads_on_hidden_device()
    assert model.value_head.summary.weight.device.type == "meta"
    assert model.variance_head.summary.weight.device.type == "meta"


def test_splitting_a_model_in_a_multi_process_run_is_refused(tiny_dirs, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="single-process"):
        _reward_model(tiny_dirs["qwen3"], "auto")
    _reward_model(tiny_dirs["qwen3"], "cpu")  # one device per process is fine


def test_offload_is_refused_before_the_model_loads(tiny_dirs, monkeypatch):
    import discoalign.models.loader as loader

    monkeypatch.setattr(loader, "load_backbone", lambda *a, **k: pytest.fail("loaded before the check"))
    with pytest.raises(ConfigError, match="offload"):
        _reward_model(tiny_dirs["qwen3"], {"model.embed_tokens": "cpu", "model.layers": "disk"})


def test_the_ppo_reward_model_honours_device_map(tiny_dirs, tmp_path):
    from discoalign.models.checkpoint import save_checkpoint
    from discoalign.models.reward_model import load_reward_model, score_responses

    model, tok = _reward_model(tiny_dirs["qwen3"])
    out = save_checkpoint(model, str(tmp_path / "rm"), tok)
    ft = FinetuningArguments(stage="ppo", reward_model=out)
    reward = load_reward_model(ModelArguments(model_name_or_path=tiny_dirs["qwen3"], device_map="auto"), ft, tok)
    assert reward.value_head.summary.weight.device == last_hidden_device(reward.decoder)
    ids, mask = _batch(tok)
    mean, variance = score_responses(reward, ids[:, :4], mask[:, :4], ids[:, 4:], mask[:, 4:])
    with torch.no_grad():
        expected, _ = model.score(ids, mask)
    torch.testing.assert_close(mean, expected, rtol=0, atol=1e-6)


def test_a_yaml_mapping_is_accepted(tiny_dirs):
    from discoalign.config import build_config

    cfg = build_config({"stage": "ppo", "reward_model": "unused", "dataset": "builtin:synthetic",
                        "output_dir": "unused", "device_map": {"": "cpu"}})  # fmt: skip
    assert cfg.model.device_map == {"": "cpu"}
    model, tok = _reward_model(tiny_dirs["qwen3"], cfg.model.device_map)
    plain, _ = _reward_model(tiny_dirs["qwen3"])
    ids, mask = _batch(tok)
    with torch.no_grad():
        torch.testing.assert_close(model.score(ids, mask)[0], plain.score(ids, mask)[0], rtol=0, atol=1e-6)
