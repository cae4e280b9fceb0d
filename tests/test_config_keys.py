"""Every config key belongs to one concern, `discoalign keys` prints them, and docs/config_keys.md is current."""

from __future__ import annotations

from pathlib import Path

from discoalign.cli.main import main
from discoalign.config.keys import GROUPS, all_fields, render, ungrouped

DOC = Path(__file__).resolve().parents[1] / "docs" / "config_keys.md"


def test_every_key_is_in_exactly_one_group():
    assert ungrouped() == []
    grouped = [key for keys in GROUPS.values() for key in keys]
    assert len(grouped) == len(set(grouped)), "a key is in two groups"
    assert set(grouped) == set(all_fields()), "a group names a key the schema does not have"


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
