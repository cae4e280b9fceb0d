"""Every YAML example validates (keys, values, decoupling rules) as `discoalign train` would read it."""

from __future__ import annotations

from pathlib import Path

import pytest

from discoalign.config import load_config
from discoalign.train.tuner import WORKFLOWS

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_config_is_valid(path, tmp_path):
    cfg = load_config(str(path), [f"output_dir={tmp_path}"])
    assert cfg.finetuning.stage in WORKFLOWS
    assert cfg.model.model_name_or_path


def test_the_readme_names_examples_that_exist():
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    import re

    for name in re.findall(r"examples/([\w.]+\.yaml)", readme):
        assert (root / "examples" / name).is_file(), name
