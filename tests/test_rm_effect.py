"""Effect: on held-out builtin:synthetic data a Disco RM's predicted spread tracks the true label noise."""

from __future__ import annotations

import pytest

from discoalign.cli.demo.rm import rm_config
from discoalign.config import build_config
from discoalign.train.tuner import run_exp


@pytest.mark.slow
def test_disco_spread_correlates_with_label_noise(tmp_path):
    # The demo's config, shortened: 2 epochs over 2000 pairs (~125 steps).
    raw = rm_config(str(tmp_path / "disco"), disco=True, synthetic_num_pairs=2000, num_train_epochs=2)
    metrics = run_exp(build_config(raw))["eval"]
    assert metrics["eval_spread_noise_spearman"] > 0.3, metrics
    # and it still ranks: well above chance against the true reward
    assert metrics["eval_true_accuracy"] > 0.75, metrics
