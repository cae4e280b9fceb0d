"""Every config key belongs to one concern, `discoalign keys` prints them, and docs/config_keys.md is current."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from discoalign.cli.main import main
from discoalign.config.keys import GROUPS, all_fields, group_classes, render
from discoalign.config.schema import ARGUMENT_CLASSES, FinetuningArguments
from discoalign.config.validate import PPO_ONLY_KEYS

DOC = Path(__file__).resolve().parents[1] / "docs" / "config_keys.md"


def test_every_key_is_in_exactly_one_group():
    grouped = {key for keys in GROUPS.values() for key in keys}
    assert [name for name in all_fields() if name not in grouped] == []
    grouped = [key for keys in GROUPS.values() for key in keys]
    assert len(grouped) == len(set(grouped)), "a key is in two groups"
    assert set(grouped) == set(all_fields()), "a group names a key the schema does not have"


def test_each_key_is_written_once_in_one_group_dataclass_and_the_groups_are_read_from_them():
    groups = group_classes()
    owners: dict[str, list[type]] = {}
    for part in groups:
        for f in dataclasses.fields(part):
            owners.setdefault(f.name, []).append(part)
    for cls in ARGUMENT_CLASSES:
        for f in dataclasses.fields(cls):
            assert len(owners.get(f.name, [])) == 1, f"`{f.name}` of {cls.__name__} is not in exactly one group"
    assert {part for part in groups if issubclass(FinetuningArguments, part)} == set(FinetuningArguments.__mro__[1:-1])
    derived: dict[str, list[str]] = {}
    for part in groups:
        derived.setdefault(part.GROUP_TITLE, []).extend(f.name for f in dataclasses.fields(part))
    assert GROUPS == {title: tuple(keys) for title, keys in derived.items()}
    assert PPO_ONLY_KEYS == GROUPS["PPO"]
    assert FinetuningArguments(pref_beta=0.3).pref_beta == 0.3 and FinetuningArguments().target_kl == 6.0


def test_the_docs_page_is_the_generated_one():
    assert DOC.read_text(encoding="utf-8") == render(markdown=True), (
        "docs/config_keys.md is stale: run `python -m discoalign.config.keys > docs/config_keys.md`"
    )


def test_keys_command_prints_one_group_and_refuses_an_unknown_one(capsys):
    assert main(["keys", "dpo"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("DPO:") and "pref_beta (default 0.1)" in out and "lora_rank" not in out
    assert main(["keys", "nonsense"]) == 2
    err = capsys.readouterr().err
    assert "no key group 'nonsense'" in err and "Heads" in err
