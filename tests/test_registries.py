"""The registries agree with each other and with the config's allowed values; the run plan decides by hand-checked
rules; checkpoints written before the head registry load as they did; no module keeps its own copy of a default
(docs/extending.md)."""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import typing
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from discoalign.config.finetuning_groups import EPISTEMIC_KINDS
from discoalign.config.heads import HEAD_NAMES, HEAD_SPECS
from discoalign.config.loader import build_config
from discoalign.config.plan import HeadPlan, build_plan
from discoalign.config.schema import ARGUMENT_CLASSES, DatasetArguments, FinetuningArguments, ModelArguments
from discoalign.errors import ConfigError
from discoalign.losses.reference_free import PREF_LOSS_TYPES
from discoalign.models import epistemic
from discoalign.models.checkpoint import has_epistemic, load_heads
from discoalign.models.heads import HEAD_MODULES
from discoalign.models.loader import load_model_with_heads
from discoalign.models.reward_model import score_responses_detailed
from discoalign.train.tuner import WORKFLOWS

SRC = Path(__file__).resolve().parents[1] / "src" / "discoalign"
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "heads_v0"  # written by commit 7e94205's save_checkpoint
SCHEMA = {f.name: f for cls in ARGUMENT_CLASSES for f in dataclasses.fields(cls)}


def literal_values(name: str) -> tuple:
    return typing.get_args(typing.get_type_hints(FinetuningArguments)[name])


def test_each_registry_agrees_with_the_config():
    assert tuple(HEAD_MODULES) == HEAD_NAMES
    assert EPISTEMIC_KINDS == ("none", *epistemic.ESTIMATORS)
    assert literal_values("epistemic") == EPISTEMIC_KINDS
    assert literal_values("stage") == tuple(WORKFLOWS)
    assert literal_values("pref_loss") == PREF_LOSS_TYPES
    for spec in HEAD_SPECS:
        for key in (spec.add_key, spec.use_key, spec.lr_ratio_key):
            assert key is None or key in SCHEMA, (spec.name, key)
        assert set(spec.stages) <= set(WORKFLOWS) and set(spec.refused) <= set(WORKFLOWS)


@pytest.mark.parametrize(
    "keys, heads, loss_heads, beta_source, ratios",
    [
        ({"stage": "rm"}, ("value_head",), (), "static", {}),
        ({"stage": "rm", "add_disco_head": True}, ("value_head", "variance_head"), (), "static", {"variance_head": 1.0}),
        ({"stage": "dpo", "add_disco_head": True, "disco_pref": True}, ("variance_head",), ("variance_head",),
         "static", {"variance_head": 10.0}),
        ({"stage": "dpo", "add_beta_head": True, "use_dynamic_beta": True, "beta_head_lr_ratio": 3.0}, ("beta_head",),
         ("beta_head",), "head", {"beta_head": 3.0}),
        ({"stage": "dpo", "pref_beta_mode": "batch"}, (), (), "batch", {}),
        ({"stage": "ppo", "reward_model": "x", "add_beta_head": True}, ("value_head", "beta_head"), (), "static",
         {"beta_head": 10.0}),
        ({"stage": "sft"}, (), (), "static", {}),
    ],
)  # fmt: skip
def test_the_plan_by_hand(keys, heads, loss_heads, beta_source, ratios):
    plan = build_config(keys).plan
    assert plan.heads.names == heads and plan.loss_heads == loss_heads and plan.beta_source == beta_source
    assert plan.head_lr_ratios == ratios
    assert plan.uses_variance == ("variance_head" in loss_heads)
    assert plan.heads.beta_centered == (keys["stage"] != "ppo")  # DPO's redistributing head vs PPO's controller
    assert plan.logs_beta == ("beta_head" in heads or beta_source == "batch")


def test_ipo_simpo_and_orpo_alone_read_length_averaged_logps():
    for loss in ("ipo", "simpo", "orpo"):
        assert build_plan(FinetuningArguments(stage="dpo", pref_loss=loss)).length_normalise
    assert not build_plan(FinetuningArguments(stage="dpo", pref_loss="hinge")).length_normalise


def test_simpo_and_orpo_alone_are_reference_free():
    for loss in ("simpo", "orpo"):
        assert build_plan(FinetuningArguments(stage="dpo", pref_loss=loss)).reference_free
    for loss in ("sigmoid", "robust", "ipo", "hinge"):
        assert not build_plan(FinetuningArguments(stage="dpo", pref_loss=loss)).reference_free


@pytest.mark.parametrize("name", ["rm_disco", "dpo_both", "ppo_beta"])
def test_heads_written_before_the_registry_load_unchanged(name):
    """Fixtures written by the code of commit 7e94205 (before the head registry): every tensor lands where it was,
    built with the settings the checkpoint recorded (a PPO policy's beta head stays uncentred)."""
    folder = str(FIXTURES / name)
    config = json.loads((FIXTURES / name / "heads_config.json").read_text())
    names = tuple(n for n in HEAD_NAMES if config.get(n))  # a head added later is absent
    plan = HeadPlan.from_heads_config(config, names)
    model, _ = load_model_with_heads(ModelArguments(model_name_or_path="builtin:tiny-qwen3"), FinetuningArguments(),
                                     heads=plan, is_trainable=False)  # fmt: skip
    assert load_heads(model, folder) == {n: "loaded" for n in names}
    saved = load_file(os.path.join(folder, "heads.safetensors"))
    assert {f"{n}.{k}" for n, h in model.heads.items() for k in h.state_dict()} == set(saved)
    for key, value in saved.items():
        name_, rest = key.split(".", 1)
        assert torch.equal(getattr(model, name_).state_dict()[rest], value), key
    if model.beta_head is not None:
        assert model.beta_head.centered == config["beta_head_centered"]
        assert model.beta_head.epsilon == config["beta_head_epsilon"]


def test_a_saved_beta_head_is_continued_with_its_kind_and_a_clash_is_refused_before_loading(tmp_path):
    """`dpo_both` was saved before `exp` existed (no `beta_head_kind`: tanh). Under `stage: dpo` `auto` would build
    `exp`; continuing the checkpoint it builds tanh, whose s(x) on the saved weights is 1 + eps tanh(w . (h - m) - c)
    by hand; an explicit `exp` is refused, naming the file and key, before the backbone loads."""
    import shutil

    from discoalign.models.tiny import write_tiny_model

    folder = write_tiny_model("qwen3", str(tmp_path / "ckpt"))
    for file in ("heads.safetensors", "heads_config.json"):
        shutil.copy(FIXTURES / "dpo_both" / file, os.path.join(folder, file))
    ft = FinetuningArguments(stage="dpo", add_beta_head=True, use_dynamic_beta=True, add_disco_head=True)
    assert build_plan(ft).heads.beta_kind == "exp"  # what `auto` builds for DPO from scratch
    model, _ = load_model_with_heads(ModelArguments(model_name_or_path=folder), ft, is_trainable=False)
    head = model.beta_head
    eps = ft.beta_head_epsilon  # the run's (the loader warns that the checkpoint's was 0.6)
    assert head.kind == "tanh" and head.epsilon == eps
    saved = load_file(os.path.join(folder, "heads.safetensors"))
    h = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    u = (h - saved["beta_head.feature_mean"]) @ saved["beta_head.summary.weight"][0]
    offset = saved.get("beta_head.logit_offset", torch.zeros(()))
    assert torch.allclose(head(h), 1 + eps * torch.tanh(u - offset), atol=1e-6)
    heads_only = tmp_path / "heads_only"  # no backbone: only an error raised before loading it can be a ConfigError
    shutil.copytree(FIXTURES / "dpo_both", heads_only)
    explicit = dataclasses.replace(ft, beta_head_kind="exp")
    with pytest.raises(ConfigError, match=r"heads_config.json, key `beta_head_kind`.*`beta_head_kind: tanh`"):
        load_model_with_heads(ModelArguments(model_name_or_path=str(heads_only)), explicit)


class _FeatureNorm:
    """A toy estimator reading the pooled features: variance = |features|^2 (checks what the protocol hands over)."""

    kind = "feature_norm"
    needs_features = True

    def variance(self, inputs):
        return (inputs.features.double() ** 2).sum(-1).float()


def test_an_estimator_that_needs_features_gets_the_hidden_state_the_value_head_reads():
    model, _ = load_model_with_heads(ModelArguments(model_name_or_path="builtin:tiny-qwen3"), FinetuningArguments(),
                                     add_value_head=True, is_trainable=False)  # fmt: skip
    assert not has_epistemic(model)
    model.epistemic = _FeatureNorm()
    assert has_epistemic(model)
    torch.manual_seed(0)
    query = torch.randint(3, 100, (3, 4))
    response = torch.randint(3, 100, (3, 5))
    response_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    scores = score_responses_detailed(model, query, torch.ones_like(query), response, response_mask)
    with torch.no_grad():
        hidden = model.hidden_states(torch.cat([query, response], 1), torch.cat([torch.ones_like(query),
                                                                                 response_mask], 1))  # fmt: skip
    last = hidden[torch.arange(3), torch.tensor([8, 6, 4])].float()
    torch.testing.assert_close(scores.epistemic, (last.double() ** 2).sum(-1).float())
    torch.testing.assert_close(scores.mean, model.value_head(last))


# ---- each default in one place ------------------------------------------------------------------------------------

# Keys of other schemas that share a name with ours: DeepSpeed's `zero_optimization.stage` is an integer.
NOT_OURS = {("stage", 0)}


def _default_copies() -> list[str]:
    """`getattr(x, "<key>", <literal>)`, `d.get("<key>", <literal>)` and `d.setdefault("<key>", <literal>)` of a
    schema key, and parameters named after a schema key whose literal default disagrees with the schema's."""
    found = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
                args = node.args
                key, default = None, None
                if name == "getattr" and len(args) == 3:
                    key, default = args[1], args[2]
                elif name in ("get", "setdefault") and len(args) == 2:
                    key, default = args[0], args[1]
                if not (isinstance(key, ast.Constant) and key.value in SCHEMA):
                    continue
                if isinstance(default, ast.Constant) and default.value is None:
                    continue  # "absent", not a default
                if isinstance(default, ast.Constant) and (key.value, default.value) in NOT_OURS:
                    continue
                found.append(f"{path.relative_to(SRC)}:{node.lineno} {ast.unparse(node)}")
            elif isinstance(node, ast.FunctionDef):
                a = node.args
                pairs = list(zip(a.args[len(a.args) - len(a.defaults) :], a.defaults))
                pairs += [(p, d) for p, d in zip(a.kwonlyargs, a.kw_defaults) if d is not None]
                for param, default in pairs:
                    if param.arg in SCHEMA and isinstance(default, ast.Constant):
                        if default.value != SCHEMA[param.arg].default:
                            found.append(f"{path.relative_to(SRC)}:{node.lineno} {param.arg}={default.value!r}")
    return found


def test_no_module_keeps_its_own_copy_of_a_default():
    assert _default_copies() == []


def test_the_copy_finder_finds_copies(tmp_path, monkeypatch):
    """The scan above is not vacuous: the stale defaults of before the plan (the loader's pooling `last`, the
    checkpoint writer's epsilon 0.5) are found."""
    stale = tmp_path / "discoalign"
    stale.mkdir()
    (stale / "stale.py").write_text(
        'def f(ft, config):\n    config.setdefault("beta_head_epsilon", 0.5)\n'
        '    return getattr(ft, "beta_head_pooling", "last")\n\n\ndef g(cutoff_len=512):\n    return cutoff_len\n'
    )
    monkeypatch.setitem(globals(), "SRC", stale)
    assert len(_default_copies()) == 3
    assert DatasetArguments().cutoff_len != 512
