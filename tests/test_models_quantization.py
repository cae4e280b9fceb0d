"""QLoRA (`quantization_bit`, `quantization_type`, `double_quantization`) on CPU with bitsandbytes and the tiny
models: config errors before any model loads, the quantised layout (4-bit / 8-bit base, fp32 trainable heads and
adapters), `rm` / `dpo` / `ppo` runs, and a QLoRA adapter + heads scoring on the unquantised base."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import yaml
from helpers import train_logs, train_losses

from discoalign.cli.main import main
from discoalign.config import build_config
from discoalign.config.schema import FinetuningArguments, ModelArguments
from discoalign.errors import ConfigError
from discoalign.models.loader import load_model_with_heads
from discoalign.train.tuner import run_exp


def _bitsandbytes_problem() -> str | None:
    """Why bitsandbytes cannot run a 4-bit layer here, or None when it can."""
    try:
        import bitsandbytes as bnb

        layer = bnb.nn.Linear4bit(16, 16, compute_dtype=torch.float32, quant_type="nf4").to("cpu")
        layer(torch.ones(1, 16))
    except Exception as e:  # ImportError, or a build without kernels for this CPU
        return f"bitsandbytes cannot run NF4 layers on this machine: {type(e).__name__}: {e}"
    return None


BNB_PROBLEM = _bitsandbytes_problem()
needs_bnb = pytest.mark.skipif(BNB_PROBLEM is not None, reason=BNB_PROBLEM or "")

# The largest |score difference| of a QLoRA reward model's adapter + heads on the unquantised fp32 base vs on
# the NF4 base it was trained on (tiny Llama, 128 synthetic texts). Measured: 0.108, correlation 0.998, score std 0.54
# (NF4 rounds each weight to one of 16 levels per block of 64; the tiny random model has no outliers to protect).
UNQUANTISED_TOLERANCE = 0.2
UNQUANTISED_MIN_CORRELATION = 0.95

RM = {
    "stage": "rm",
    "model_name_or_path": "builtin:tiny-llama",
    "finetuning_type": "lora",
    "lora_rank": 4,
    "quantization_bit": 4,
    "add_disco_head": True,
    "disco_pref": True,
    "dataset": "builtin:synthetic",
    "eval_dataset": "builtin:synthetic",
    "synthetic_num_pairs": 64,
    "cutoff_len": 48,
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 32,
    "max_steps": 4,
    "logging_steps": 1,
    "learning_rate": 5e-3,
    "save_strategy": "no",
    "num_score_samples": 0,
}


# ---- config errors, before any model loads -------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"quantization_bit": 4, "finetuning_type": "full"}, ["quantization_bit: 4", "finetuning_type: lora"]),
        ({"quantization_bit": 3, "finetuning_type": "lora"}, ["quantization_bit", "4 or 8"]),
        ({"quantization_type": "int4"}, ["quantization_type"]),
        ({"device_map": "nowhere"}, ["device_map: nowhere", "strategy"]),
        ({"device_map": "disk"}, ["offload", "disk"]),
    ],
)
def test_bad_quantisation_and_device_map_settings_exit_2(tmp_path, capsys, overrides, words, monkeypatch):
    import discoalign.models.loader as loader

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the config was checked")

    monkeypatch.setattr(loader, "load_backbone", no_model)
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({**RM, **overrides, "output_dir": str(tmp_path / "out")}))
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for word in words:
        assert word in err, (word, err)


def test_offloading_device_map_dict_is_refused():
    from discoalign.config.placement import check_no_offload, parse_device_map

    with pytest.raises(ConfigError, match="offload"):
        parse_device_map({"model.layers.0": "cuda:0", "model.layers.1": "cpu"})
    with pytest.raises(ConfigError, match="offload"):
        check_no_offload({"0", "disk"})
    assert parse_device_map("cpu") == {"": "cpu"}
    assert parse_device_map(1) == {"": 1} and parse_device_map("auto") == "auto"
    assert parse_device_map({"": "cpu"}) == {"": "cpu"}  # one device is placement, not offload


def test_missing_bitsandbytes_is_a_config_error(monkeypatch):
    from discoalign.config import placement as quantization

    monkeypatch.setattr(quantization, "bitsandbytes_available", lambda: False)
    with pytest.raises(ConfigError, match="bitsandbytes"):
        build_config({**RM, "output_dir": "unused"})


# ---- the quantised model -------------------------------------------------------------------------


def _load(bits: int, **model_keys):
    return load_model_with_heads(
        ModelArguments(model_name_or_path="builtin:tiny-llama", quantization_bit=bits, **model_keys),
        FinetuningArguments(finetuning_type="lora", lora_rank=4, add_disco_head=True),
        add_value_head=True,
    )


@needs_bnb
@pytest.mark.parametrize("bits, quant_type, double", [(4, "nf4", True), (4, "fp4", False), (8, "nf4", True)])
def test_quantised_base_with_fp32_trainable_heads_and_adapters(bits, quant_type, double):
    import bitsandbytes as bnb

    model, tok = _load(bits, quantization_type=quant_type, double_quantization=double)
    layer_type = bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt
    quantised = [m for m in model.causal_lm.modules() if isinstance(m, layer_type)]
    assert len(quantised) == 2 * 7  # every linear layer of the 2 decoder layers; the LM head stays unquantised
    if bits == 4:
        state = quantised[0].weight.quant_state
        assert state.quant_type == quant_type and bool(state.nested) is double
    for head in (model.value_head, model.variance_head):
        assert all(p.dtype == torch.float32 and p.requires_grad for p in head.parameters())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.split(".")[0] in ("value_head", "variance_head") for n in trainable)

    model.train()
    batch = tok(["Topic: art. Describe a garden. bright calm", "Hi rude"], return_tensors="pt", padding=True)
    mean, variance = model.score(batch["input_ids"], batch["attention_mask"])
    (mean.sum() + variance.sum()).backward()
    assert model.value_head.summary.weight.grad.abs().sum() > 0
    assert model.variance_head.summary.weight.grad.abs().sum() > 0
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b)


@needs_bnb
def test_an_eval_pass_leaves_the_gradients_of_a_quantised_model_unchanged():
    # bitsandbytes repacks 4-bit weights for a backward-less CPU kernel after an eval no-grad pass (PPO's rollout);
    # a model that trains must keep computing the same gradients afterwards.
    def grads(eval_first: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model, tok = _load(4)
        batch = tok(["Topic: art. Describe a garden. bright calm", "Hi rude"], return_tensors="pt", padding=True)
        if eval_first:
            with torch.no_grad():
                model.eval().score(batch["input_ids"], batch["attention_mask"])
        model.train()
        mean, _ = model.score(batch["input_ids"], batch["attention_mask"])
        mean.pow(2).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    fresh, after_eval = grads(False), grads(True)
    assert fresh.keys() == after_eval.keys()
    first_layer_b = [n for n in fresh if "layers.0." in n and "lora_B" in n]
    assert first_layer_b and all(fresh[n].abs().sum() > 0 for n in first_layer_b)
    for name in fresh:
        torch.testing.assert_close(after_eval[name], fresh[name], rtol=1e-5, atol=1e-7, msg=name)


# ---- runs ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qlora_rm(tmp_path_factory):
    if BNB_PROBLEM is not None:
        pytest.skip(BNB_PROBLEM)
    out = tmp_path_factory.mktemp("qlora") / "rm"
    run_exp(build_config({**RM, "output_dir": str(out), "do_train": True, "do_eval": True}))
    return str(out)


def _eval_scores(model, tok, n: int = 64) -> torch.Tensor:
    from discoalign.data.synthetic import synthetic_pair_rows

    rows = synthetic_pair_rows(n, seed=7)
    texts = [r["prompt"][-1]["content"] + " " + r[side][0]["content"] for r in rows for side in ("chosen", "rejected")]
    batch = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        mean, _ = model.score(batch["input_ids"], batch["attention_mask"])
    return mean


@needs_bnb
def test_qlora_reward_model_scores_on_the_unquantised_base_within_tolerance(qlora_rm):
    assert os.path.isfile(os.path.join(qlora_rm, "adapter_model.safetensors"))
    assert not os.path.exists(os.path.join(qlora_rm, "model.safetensors"))  # the base is never saved
    heads_config = json.load(open(os.path.join(qlora_rm, "heads_config.json")))
    assert heads_config["base_model_name_or_path"] == "builtin:tiny-llama"

    ft = FinetuningArguments(finetuning_type="lora", add_disco_head=True)
    quantised, tok = load_model_with_heads(
        ModelArguments(model_name_or_path=qlora_rm, quantization_bit=4), ft, add_value_head=True, is_trainable=False
    )
    plain, _ = load_model_with_heads(ModelArguments(model_name_or_path=qlora_rm), ft, add_value_head=True,
                                     is_trainable=False)  # fmt: skip
    q_scores, p_scores = _eval_scores(quantised, tok), _eval_scores(plain, tok)
    assert not any(isinstance(m, torch.nn.Linear) and "4bit" in type(m).__name__ for m in plain.modules())
    diff = (q_scores - p_scores).abs().max().item()
    corr = torch.corrcoef(torch.stack([q_scores, p_scores]))[0, 1].item()
    print(
        f"QLoRA adapter on the fp32 base: max |score diff| {diff:.4f}, correlation {corr:.4f}, "
        f"score std {p_scores.std().item():.4f}"
    )
    assert diff < UNQUANTISED_TOLERANCE and corr > UNQUANTISED_MIN_CORRELATION


@needs_bnb
def test_qlora_dpo_reference_is_the_quantised_base_with_adapters_disabled(tmp_path):
    cfg = build_config({
        **{k: v for k, v in RM.items() if k not in ("add_disco_head", "disco_pref", "eval_dataset")},
        "stage": "dpo", "max_steps": 2, "output_dir": str(tmp_path), "do_train": True, "use_cpu": True,
    })  # fmt: skip
    run_exp(cfg)
    losses = train_losses(tmp_path)
    # LoRA B = 0 at the first step, so policy and reference (same quantised base, adapters off) give the same
    # log-probs: margin 0 and the sigmoid loss is exactly log 2.
    assert losses[0] == pytest.approx(math.log(2), abs=1e-5)
    assert (tmp_path / "adapter_model.safetensors").is_file()


@needs_bnb
@pytest.mark.slow
def test_qlora_ppo_policy_with_the_qlora_reward_model(tmp_path, qlora_rm):
    cfg = build_config({
        "stage": "ppo", "model_name_or_path": "builtin:tiny-llama", "finetuning_type": "lora", "lora_rank": 4,
        "quantization_bit": 4, "reward_model": qlora_rm, "reward_model_type": "lora", "dataset": "builtin:synthetic",
        "synthetic_num_pairs": 16, "max_new_tokens": 4, "per_device_train_batch_size": 4, "ppo_epochs": 1,
        "max_steps": 2, "logging_steps": 1, "output_dir": str(tmp_path), "save_strategy": "no", "do_train": True,
        "disable_tqdm": True, "num_score_samples": 0,
    })  # fmt: skip
    run_exp(cfg)
    logs = train_logs(tmp_path)
    assert [e["step"] for e in logs] == [1, 2]
    assert abs(logs[0]["objective/kl"]) < 1e-6  # reference = the quantised policy with its adapters disabled
    assert all(math.isfinite(e["objective/scores"]) for e in logs)
    assert (tmp_path / "adapter_model.safetensors").is_file()


@needs_bnb
def test_a_t5_reward_model_quantises_and_a_builtin_multimodal_model_is_refused():
    import bitsandbytes as bnb

    from discoalign.config.builtin_models import TINY_MULTIMODAL_ARCHS

    ft = FinetuningArguments(finetuning_type="lora", lora_rank=4)
    model, tok = load_model_with_heads(ModelArguments(model_name_or_path="builtin:tiny-t5", quantization_bit=4), ft,
                                       add_value_head=True)  # fmt: skip
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.causal_lm.get_decoder().modules())
    batch = tok(["Describe a garden. bright calm"], return_tensors="pt")
    mean, _ = model.score(batch["input_ids"], batch["attention_mask"])
    mean.sum().backward()
    assert model.value_head.summary.weight.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="multimodal"):
        load_model_with_heads(ModelArguments(model_name_or_path=f"builtin:tiny-{TINY_MULTIMODAL_ARCHS[0]}",
                                             quantization_bit=4), ft, add_value_head=True)  # fmt: skip
