"""Config loading and every rule of docs/design.md §4, checked before any model loads."""

from __future__ import annotations

import pytest
import yaml

from discoalign.config import build_config, load_config
from discoalign.errors import ConfigError

BASE = {"model_name_or_path": "builtin:tiny-qwen3", "dataset": "builtin:synthetic", "output_dir": "unused"}


def cfg(**kw):
    return build_config({**BASE, **kw})


def test_disco_pref_requires_disco_head():
    with pytest.raises(ConfigError, match="add_disco_head"):
        cfg(stage="rm", disco_pref=True)


def test_dynamic_beta_requires_beta_head():
    with pytest.raises(ConfigError, match="add_beta_head"):
        cfg(stage="dpo", use_dynamic_beta=True)


@pytest.mark.parametrize("key", ["add_beta_head", "use_dynamic_beta"])
def test_no_beta_in_reward_modelling(key):
    kw = {key: True}
    if key == "use_dynamic_beta":
        kw["add_beta_head"] = True
    with pytest.raises(ConfigError, match=r"stage: rm"):
        cfg(stage="rm", **kw)


@pytest.mark.parametrize("loss", ["ipo", "hinge"])
def test_disco_only_in_sigmoid_family(loss):
    with pytest.raises(ConfigError, match="probit member of the sigmoid family"):
        cfg(stage="dpo", add_disco_head=True, disco_pref=True, pref_loss=loss)


def test_head_added_but_unused_is_allowed_and_logged(caplog):
    with caplog.at_level("WARNING"):
        c = cfg(stage="dpo", add_disco_head=True, add_beta_head=True)
    assert c.finetuning.add_disco_head and not c.finetuning.disco_pref
    assert c.finetuning.add_beta_head and not c.finetuning.use_dynamic_beta
    text = caplog.text
    assert text.count("`add_disco_head: true` with `disco_pref: false`") == 1
    assert text.count("`add_beta_head: true` with `use_dynamic_beta: false`") == 1


def test_unknown_key_suggests_closest():
    with pytest.raises(ConfigError, match=r"`pref_bta`\. Did you mean `pref_beta`\?"):
        cfg(pref_bta=0.1)
    with pytest.raises(ConfigError, match=r"Did you mean `learning_rate`"):
        cfg(learning_rat=1e-4)


def test_bad_value_types_name_the_key():
    with pytest.raises(ConfigError, match=r"`pref_beta`.*expected a number"):
        cfg(pref_beta="high")
    with pytest.raises(ConfigError, match=r"`pref_loss`.*one of"):
        cfg(pref_loss="kto")
    with pytest.raises(ConfigError, match=r"`beta_head_epsilon`"):
        cfg(stage="dpo", add_beta_head=True, beta_head_epsilon=1.5)
    with pytest.raises(ConfigError, match=r"TrainingArguments key"):
        cfg(lr_scheduler_type="not-a-scheduler")


def test_yaml_overrides_and_resolved_config_saved(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({**BASE, "stage": "dpo", "pref_beta": 0.1, "output_dir": str(tmp_path / "out")}))
    c = load_config(str(path), ["pref_beta=0.25", "learning_rate=3e-4", "add_beta_head=true"])
    assert c.finetuning.pref_beta == 0.25
    assert c.training.learning_rate == 3e-4
    assert c.finetuning.add_beta_head is True
    saved = yaml.safe_load(open(c.save()))
    assert saved["pref_beta"] == 0.25 and saved["learning_rate"] == 3e-4 and saved["stage"] == "dpo"
    assert saved["model_name_or_path"] == "builtin:tiny-qwen3"


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage: [rm\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    nested = tmp_path / "nested.yaml"
    nested.write_text("lora:\n  rank: 8\n")
    with pytest.raises(ConfigError, match="must be flat"):
        load_config(str(nested))
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["pref_beta"])


def test_validation_runs_before_any_model_loads(monkeypatch):
    import discoalign.models as models_pkg  # noqa: F401  (the package exists; nothing in it may be called)

    called = []
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", lambda *a, **k: called.append(a))
    with pytest.raises(ConfigError):
        cfg(stage="rm", disco_pref=True)
    assert called == []


def test_yaml_no_for_strategies_and_exponent_floats(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("save_strategy: no\nlearning_rate: 3e-4\n")
    c = load_config(str(path), ["eval_strategy=no", "output_dir=" + str(tmp_path)])
    assert c.training.save_strategy == "no" and c.training.eval_strategy == "no"
    assert c.training.learning_rate == 3e-4


def test_speed_switches_checked_before_loading():
    with pytest.raises(ConfigError, match="logps_chunk_size"):
        cfg(stage="dpo", logps_chunk_size=-1)
    with pytest.raises(ConfigError, match="attn_implementation"):
        cfg(stage="dpo", pack_pairs=True, attn_implementation="flash_attention_2")
    with pytest.raises(ConfigError, match="text-only"):
        cfg(stage="rm", pack_pairs=True, model_name_or_path="builtin:tiny-qwen2-vl")
    c = cfg(stage="rm", pack_pairs=True, attn_implementation="sdpa")
    assert c.data.pack_pairs
