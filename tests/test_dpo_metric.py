"""DPO metrics against values computed by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from discoalign.losses.dpo_metrics import step_metrics
from discoalign.train.dpo.metric import eval_metrics

# chosen log-ratios (0.5, -1.0), rejected log-ratios (-0.5, 1.0): pair 0 correct, pair 1 wrong
PC, PR = torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -1.0])
RC, RR = torch.tensor([-1.5, -2.0]), torch.tensor([-1.5, -2.0])


def test_step_metrics_by_hand_with_scalar_beta():
    m = step_metrics(PC, PR, RC, RR, 0.1, log_beta=False)
    assert m["rewards/chosen"].item() == pytest.approx((0.05 - 0.1) / 2)
    assert m["rewards/rejected"].item() == pytest.approx((-0.05 + 0.1) / 2)
    assert m["rewards/accuracies"].item() == 0.5
    assert m["rewards/margins"].item() == pytest.approx((0.1 - 0.2) / 2)
    assert m["logps/chosen"].item() == -2.0 and m["logps/rejected"].item() == -1.5
    assert not any(k.startswith(("beta/", "variance/")) for k in m)


def test_step_metrics_by_hand_with_per_pair_beta_and_variances():
    beta = torch.tensor([0.2, 0.05])
    m = step_metrics(PC, PR, RC, RR, beta, log_beta=True, chosen_var=torch.tensor([1.0, 3.0]),
                     rejected_var=torch.tensor([2.0, 2.0]))  # fmt: skip
    assert m["rewards/chosen"].item() == pytest.approx((0.2 * 0.5 + 0.05 * -1.0) / 2)
    assert m["beta/mean"].item() == pytest.approx(0.125)
    assert m["beta/min"].item() == pytest.approx(0.05) and m["beta/max"].item() == pytest.approx(0.2)
    assert m["beta/mean_when_correct"].item() == pytest.approx(0.2)
    assert m["beta/mean_when_wrong"].item() == pytest.approx(0.05)
    assert m["variance/chosen"].item() == 2.0 and m["variance/rejected"].item() == 2.0


def test_step_metrics_skip_empty_groups():
    m = step_metrics(PC[:1], PR[:1], RC[:1], RR[:1], 0.1, log_beta=True)
    assert "beta/mean_when_correct" in m and "beta/mean_when_wrong" not in m


def test_eval_metrics_by_hand():
    nan = float("nan")
    # columns: implicit margin, policy log-prob margin, beta, var_c, var_r
    predictions = np.array(
        [
            [1.0, 2.0, 0.10, 1.0, 1.0],
            [-1.0, 1.0, 0.20, 2.0, 2.0],
            [0.0, -1.0, 0.30, 3.0, 3.0],
            [2.0, -3.0, 0.40, 4.0, 4.0],
        ]
    )
    # true rewards: pairs 0, 1 truly prefer chosen; 2, 3 (noisy labels) prefer rejected
    labels = np.array([[0.5, 0.1, 0.0], [0.3, 0.2, 0.0], [0.1, 0.4, 0.3], [0.0, 0.2, 0.3]])
    m = eval_metrics(predictions, labels)
    # a tie (margin exactly 0) is dropped from every accuracy, as TRL's reward accuracy drops it
    assert m["implicit_accuracy"] == pytest.approx(2 / 3)
    assert m["true_pref_accuracy"] == pytest.approx((1 + 0 + 0) / 3)
    assert m["true_pref_logp_accuracy"] == pytest.approx((1 + 1 + 1 + 1) / 4)
    assert m["beta_clean"] == pytest.approx(0.15) and m["beta_noisy"] == pytest.approx(0.35)
    assert m["variance_clean"] == pytest.approx(1.5) and m["variance_noisy"] == pytest.approx(3.5)
    assert m["beta_noise_spearman"] == pytest.approx(np.corrcoef([1, 2, 3, 4], [1.5, 1.5, 3.5, 3.5])[0, 1])

    no_heads = predictions.copy()
    no_heads[:, 2:] = nan
    m = eval_metrics(no_heads, np.full((4, 3), nan))
    assert set(m) == {"implicit_accuracy"}
    all_tied = predictions.copy()
    all_tied[:, 0] = 0.0  # the starting policy: d = 0 everywhere, so no pair has a prediction
    assert np.isnan(eval_metrics(all_tied, labels)["true_pref_accuracy"])
