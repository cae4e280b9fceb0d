"""Dr. DPO (`pref_loss: dr_dpo`, Wu et al. 2025): the batch loss `-beta' log mean_i exp(-l_i / beta')` of DPO's
per-pair losses against a float64 hand computation (value and per-pair gradient weights), its limits, the
objective and the trainer computing it, and the config rules of `dr_dpo_beta` (one-paragraph errors, exit code 2).
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import dpo_config, dpo_trainer

from discoalign.cli.main import main
from discoalign.errors import ConfigError
from discoalign.losses.dpo import dpo_loss, dr_dpo_batch_loss
from discoalign.losses.dpo_objective import DPOObjective, DPOSettings
from discoalign.losses.pair import PairBatch

PW = [-3.2, -10.5, -7.0, -1.25, -22.0]
PL = [-4.0, -9.0, -7.5, -30.0, -2.0]
RW = [-3.0, -10.0, -7.2, -2.0, -21.0]
RL = [-3.5, -9.5, -7.4, -28.0, -3.0]


def hand_losses(beta: float) -> list[float]:
    """DPO's -log sigmoid(beta d) per pair, in float64 by hand (log1p(exp(-z)))."""
    out = []
    for pw, pl, rw, rl in zip(PW, PL, RW, RL):
        z = beta * ((pw - rw) - (pl - rl))
        out.append(math.log1p(math.exp(-z)))
    return out


def hand_dr_dpo(losses: list[float], bp: float) -> float:
    return -bp * math.log(sum(math.exp(-x / bp) for x in losses) / len(losses))


@pytest.mark.parametrize("bp", [0.25, 1.0, 4.0])
def test_batch_loss_and_gradient_weights_match_hand_computation(bp):
    beta = 0.5
    ls = hand_losses(beta)
    losses = torch.tensor(ls, dtype=torch.float64, requires_grad=True)
    value = dr_dpo_batch_loss(losses, bp)
    assert value.item() == pytest.approx(hand_dr_dpo(ls, bp), abs=1e-6)  # float64 inside, fp32 out
    value.backward()
    # d/dl_i of -b' log mean exp(-l / b') is the softmax weight exp(-l_i / b') / sum_j exp(-l_j / b')
    z = sum(math.exp(-x / bp) for x in ls)
    assert losses.grad.tolist() == pytest.approx([math.exp(-x / bp) / z for x in ls], abs=1e-6)
    # the pair with the largest loss (a confident disagreement) gets the smallest weight
    assert int(losses.grad.argmin()) == max(range(len(ls)), key=ls.__getitem__)


def test_limits_mean_and_single_pair():
    ls = torch.tensor(hand_losses(0.5), dtype=torch.float64)
    assert dr_dpo_batch_loss(ls, 1e6).item() == pytest.approx(ls.mean().item(), abs=1e-5)  # beta' -> inf: DPO
    assert dr_dpo_batch_loss(ls[:1], 0.3).item() == pytest.approx(ls[0].item(), abs=1e-6)  # one pair: its loss
    assert dr_dpo_batch_loss(ls, 1.0).item() <= ls.mean().item()  # Jensen: never above the mean
    huge = torch.tensor([1e4, 2e4, 0.5])
    assert torch.isfinite(dr_dpo_batch_loss(huge, 0.01))  # logsumexp: finite for any losses
    with pytest.raises(ValueError, match="beta' must be positive"):
        dr_dpo_batch_loss(ls, 0.0)


def test_objective_uses_dpo_per_pair_losses_and_the_dr_dpo_batch_loss():
    t = {k: torch.tensor(v, dtype=torch.float64) for k, v in (("pw", PW), ("pl", PL), ("rw", RW), ("rl", RL))}
    ones = torch.ones(len(PW))
    batch = PairBatch(t["pw"], t["pl"], t["rw"], t["rl"], ones, ones)
    beta, bp = 0.5, 0.7
    out = DPOObjective(DPOSettings(pref_beta=beta, loss_type="dr_dpo", dr_dpo_beta=bp))(batch, training=True)
    assert out.losses.tolist() == pytest.approx(hand_losses(beta), abs=1e-6)
    assert out.loss.item() == pytest.approx(hand_dr_dpo(hand_losses(beta), bp), abs=1e-6)
    sigmoid, _, _ = dpo_loss(t["pw"], t["pl"], t["rw"], t["rl"], beta, loss_type="sigmoid")
    assert torch.equal(out.losses, sigmoid)  # the per-pair loss is DPO's, bit for bit


def test_trainer_loss_is_the_dr_dpo_batch_loss(tmp_path):
    run = {"synthetic_num_pairs": 8, "per_device_train_batch_size": 8}
    trainer = dpo_trainer(tmp_path, run, pref_loss="dr_dpo", dr_dpo_beta=0.5, pref_beta=2.0)
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(8)]))
    with torch.no_grad():
        loss, (_, result) = trainer.compute_loss(trainer.model, batch, return_outputs=True)
    per_pair = result.losses.double().tolist()
    assert loss.item() == pytest.approx(hand_dr_dpo(per_pair, 0.5), abs=1e-5)


@pytest.mark.parametrize(
    "keys, message",
    [
        ({"pref_loss": "sigmoid", "dr_dpo_beta": 0.5}, r"`dr_dpo_beta` is Dr. DPO's beta' and applies to `stage: dpo`"),
        ({"pref_loss": "dr_dpo", "dr_dpo_beta": 0.0}, r"`dr_dpo_beta` is 0.0; Dr. DPO's beta' must be positive"),
        ({"pref_loss": "dr_dpo", "dr_dpo_beta": -1.0}, r"`dr_dpo_beta` is -1.0"),
        ({"pref_loss": "dr_dpo", "label_smoothing": 0.1}, r"`label_smoothing` applies to"),
    ],
)
def test_config_errors_name_the_key(tmp_path, keys, message):
    with pytest.raises(ConfigError, match=message):
        dpo_config(tmp_path, **keys)


def test_config_error_exits_2_before_any_model_loads(tmp_path, capsys):
    import yaml

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"stage": "dpo", "model_name_or_path": "/nonexistent/model", "dr_dpo_beta": 2.0,
                                    "dataset": "builtin:synthetic", "output_dir": str(tmp_path / "out")}))  # fmt: skip
    code = main(["train", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and "`dr_dpo_beta` is Dr. DPO's beta'" in err and "Traceback" not in err
