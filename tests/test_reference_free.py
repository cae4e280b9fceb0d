"""SimPO and ORPO (`pref_loss: simpo | orpo`): hand computations in float64, parity with TRL 1.16's CPO (`simpo`)
and ORPO trainers' loss and metric code for a fixed batch, no reference model loaded or run, the decoupling rules
(one error per refused key, exit code 2), and a tiny end-to-end run.

TRL parity: our trainer's loss and metrics for 4 conversational pairs against TRL's own `get_batch_logps`
(average_log_prob=True) on the full logits of the same weights and ids, then TRL's `get_batch_loss_metrics` (its
`cpo_loss` / `odds_ratio_loss` and its metric code) on those log-probs. The one difference, by design: TRL's ORPO
NLL is a token mean over prompt *and* response of all chosen rows; ours is LlamaFactory's (and the paper's), the
chosen response's mean token NLL averaged over pairs, so the test feeds TRL that NLL.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers import dpo_config, train_logs

from discoalign.cli.main import main
from discoalign.config import build_config
from discoalign.data.synthetic import synthetic_pair_rows
from discoalign.errors import ConfigError
from discoalign.losses.reference_free import log1mexp, orpo_loss, simpo_loss
from discoalign.train.dpo.workflow import build_dpo_trainer, run_dpo

BATCH = 4
ROWS = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in synthetic_pair_rows(6, seed=3)]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ref_free") / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS), encoding="utf-8")
    return str(path)


def _trainer(tmp_path, model_dir, data_file, **keys):
    cfg = build_config({
        "stage": "dpo", "model_name_or_path": model_dir, "dataset": data_file, "cutoff_len": 4096,
        "output_dir": str(tmp_path / "ours"), "per_device_train_batch_size": BATCH, "do_train": True,
        "use_cpu": True, **keys,
    })  # fmt: skip
    return build_dpo_trainer(cfg)[0]


def _our_step(trainer):
    """Our loss and metrics on the first BATCH rows, and the collated batch."""
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(BATCH)])
    with torch.no_grad():
        _, result = trainer.pair_forward(trainer.model, batch)
    return result, batch


def _trl_avg_logps(model_dir, batch, trl_trainer_class):
    """TRL's length-averaged log-probs of our (2B, T) batch from the full logits of the same weights."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logps = trl_trainer_class.get_batch_logps(logits, batch["labels"].clone(), average_log_prob=True)
    return logps[:BATCH], logps[BATCH:]


def _fake_trl(trainer_class, chosen, rejected, nll, **attrs):
    """An object that runs TRL's `get_batch_loss_metrics` (loss + metric code) on given log-probs."""
    fake = SimpleNamespace(
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x),
        aux_loss_enabled=False, alpha=0.0, **attrs,
    )  # fmt: skip
    logits = torch.zeros(BATCH, 2, 3)  # TRL logs mean logits; we do not build them (docs/dpo.md)
    fake.concatenated_forward = lambda model, batch: (chosen, rejected, logits, logits, nll)
    for name in ("cpo_loss", "odds_ratio_loss"):
        if hasattr(trainer_class, name):
            setattr(fake, name, getattr(trainer_class, name).__get__(fake))
    return trainer_class.get_batch_loss_metrics(fake, None, {}, "train")


@pytest.mark.parametrize("gamma, ls", [(0.5, 0.0), (1.2, 0.1)])
def test_simpo_matches_trl_cpo_simpo(tmp_path, tiny_dirs, data_file, gamma, ls):
    pytest.importorskip("trl")
    from trl.experimental.cpo import CPOTrainer

    model_dir = tiny_dirs["qwen3"]
    beta = 2.0
    ours = _trainer(tmp_path, model_dir, data_file, pref_loss="simpo", pref_beta=beta, simpo_gamma=gamma,
                    label_smoothing=ls)  # fmt: skip
    result, batch = _our_step(ours)
    chosen, rejected = _trl_avg_logps(model_dir, batch, CPOTrainer)
    assert torch.allclose(result.scaled.chosen_logps, chosen, atol=1e-5)
    assert torch.allclose(result.scaled.rejected_logps, rejected, atol=1e-5)
    # cpo_alpha 0: SimPO without CPO's behaviour-cloning term (TRL's `alphapo` sugar sets it so too).
    loss, metrics = _fake_trl(CPOTrainer, chosen, rejected, torch.tensor(0.0), beta=beta, simpo_gamma=gamma,
                              label_smoothing=ls, loss_type="simpo", cpo_alpha=0.0)  # fmt: skip
    assert result.loss.item() == pytest.approx(loss.item(), abs=1e-5)
    assert abs(result.loss.item() - math.log(2)) > 1e-3
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected"):  # fmt: skip
        assert result.metrics[key].item() == pytest.approx(metrics[key], abs=1e-5), key


def test_orpo_matches_trl_odds_ratio_loss(tmp_path, tiny_dirs, data_file):
    pytest.importorskip("trl")
    from trl.experimental.orpo import ORPOTrainer

    model_dir = tiny_dirs["qwen3"]
    beta = 0.25
    ours = _trainer(tmp_path, model_dir, data_file, pref_loss="orpo", pref_beta=beta)
    result, batch = _our_step(ours)
    chosen, rejected = _trl_avg_logps(model_dir, batch, ORPOTrainer)
    assert torch.allclose(result.scaled.chosen_logps, chosen, atol=1e-5)
    nll = -chosen.mean()  # ours (LlamaFactory's): the chosen responses' mean token NLL, averaged over pairs
    loss, metrics = _fake_trl(ORPOTrainer, chosen, rejected, nll, beta=beta)
    assert result.loss.item() == pytest.approx(loss.item(), abs=1e-5)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected", "nll_loss", "log_odds_ratio", "log_odds_chosen"):  # fmt: skip
        assert result.metrics[key].item() == pytest.approx(metrics[key], abs=1e-5), key


# ---- hand computations ------------------------------------------------------------------------------------------

A_W = torch.tensor([-0.3, -1.7, -2.5, -0.01], dtype=torch.float64)
A_L = torch.tensor([-0.9, -1.1, -4.0, -0.02], dtype=torch.float64)


def test_simpo_by_hand():
    beta, gamma, ls = 2.5, 0.7, 0.1
    got = simpo_loss(A_W, A_L, beta, gamma, ls)
    for i in range(4):
        z = beta * (A_W[i].item() - A_L[i].item()) - gamma
        want = -(1 - ls) * math.log(1 / (1 + math.exp(-z))) - ls * math.log(1 / (1 + math.exp(z)))
        assert got[i].item() == pytest.approx(want, rel=1e-6)


def test_orpo_by_hand():
    beta = 0.1
    losses, metrics = orpo_loss(A_W.float(), A_L.float(), beta)
    log_odds = []
    for i in range(4):
        pw, pl = math.exp(A_W[i].item()), math.exp(A_L[i].item())
        lo = math.log((pw / (1 - pw)) / (pl / (1 - pl)))
        log_odds.append(lo)
        want = -A_W[i].item() + beta * -math.log(1 / (1 + math.exp(-lo)))
        assert losses[i].item() == pytest.approx(want, rel=1e-5)
    assert metrics["log_odds_chosen"].item() == pytest.approx(sum(log_odds) / 4, rel=1e-5)
    assert metrics["nll_loss"].item() == pytest.approx(-A_W.mean().item(), rel=1e-6)


def test_log1mexp_is_exact_on_both_branches():
    x = torch.tensor([-1e-6, -0.5, -0.7, -30.0], dtype=torch.float64)
    assert torch.allclose(log1mexp(x), torch.log(1 - torch.exp(x)), rtol=1e-9)
    assert torch.isfinite(log1mexp(torch.tensor([-1e-7], dtype=torch.float32))).all()


def test_orpo_gradient_matches_float64_autograd():
    a_w = A_W.clone().requires_grad_(True)
    a_l = A_L.clone().requires_grad_(True)
    loss = orpo_loss(a_w, a_l, 0.3)[0].sum()
    loss.backward()
    ref_w, ref_l = A_W.clone().requires_grad_(True), A_L.clone().requires_grad_(True)
    lo = (ref_w - ref_l) - (torch.log(1 - ref_w.exp()) - torch.log(1 - ref_l.exp()))
    (-ref_w - 0.3 * F.logsigmoid(lo)).sum().backward()
    assert torch.allclose(a_w.grad.double(), ref_w.grad, rtol=1e-4) and torch.allclose(a_l.grad.double(), ref_l.grad,
                                                                                        rtol=1e-4)  # fmt: skip


# ---- no reference model -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("finetuning_type", ["full", "lora"])
@pytest.mark.parametrize("loss", ["simpo", "orpo"])
def test_no_reference_is_loaded_or_run(tmp_path, monkeypatch, finetuning_type, loss):
    import discoalign.train.dpo.workflow as workflow

    copies = []
    monkeypatch.setattr(workflow, "frozen_copy", lambda m: copies.append(m) or m)
    trainer = build_dpo_trainer(dpo_config(tmp_path, {"synthetic_num_pairs": 8, "per_device_train_batch_size": 4},
                                           pref_loss=loss, finetuning_type=finetuning_type, lora_rank=4))[0]  # fmt: skip
    assert trainer.ref_model is None and copies == []
    if finetuning_type == "lora":
        monkeypatch.setattr(type(trainer.model), "disable_adapter", lambda self: pytest.fail("reference forward"))
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(4)]))
    loss_value = trainer.compute_loss(trainer.model, batch)
    loss_value.backward()
    assert trainer.reference_forward_calls == 0 and torch.isfinite(loss_value)


# ---- the decoupling rules -----------------------------------------------------------------------------------------

REFUSED = [
    ({"ref_model_name_or_path": "builtin:tiny-qwen3"}, "ref_model_name_or_path"),
    ({"precompute_ref_logps": True}, "precompute_ref_logps"),
    ({"add_beta_head": True}, "add_beta_head"),
    ({"add_beta_head": True, "use_dynamic_beta": True}, "add_beta_head"),
    ({"use_dynamic_beta": True}, "use_dynamic_beta"),
    ({"add_disco_head": True, "disco_pref": True}, "disco_pref"),
    ({"pref_beta_mode": "batch"}, "pref_beta_mode"),
]


@pytest.mark.parametrize("loss", ["simpo", "orpo"])
@pytest.mark.parametrize("keys, named", REFUSED)
def test_refused_keys_are_named(tmp_path, loss, keys, named):
    with pytest.raises(ConfigError, match=rf"`{named}` cannot be used with `pref_loss: {loss}`"):
        dpo_config(tmp_path, pref_loss=loss, **keys)


def test_simpo_only_keys(tmp_path):
    with pytest.raises(ConfigError, match=r"`simpo_gamma` is SimPO's target margin"):
        dpo_config(tmp_path, pref_loss="sigmoid", simpo_gamma=1.0)
    with pytest.raises(ConfigError, match=r"`label_smoothing` applies to"):
        dpo_config(tmp_path, pref_loss="orpo", label_smoothing=0.1)
    dpo_config(tmp_path, pref_loss="simpo", label_smoothing=0.1, simpo_gamma=1.0, pref_ftx=0.5, add_disco_head=True)


def test_refused_key_exits_2_before_any_model_loads(tmp_path, capsys):
    import yaml

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"stage": "dpo", "model_name_or_path": "/nonexistent/model", "pref_loss": "orpo",
                                    "precompute_ref_logps": True, "dataset": "builtin:synthetic",
                                    "output_dir": str(tmp_path / "out")}))  # fmt: skip
    code = main(["train", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and "`precompute_ref_logps` cannot be used with `pref_loss: orpo`" in err


# ---- end to end ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["simpo", "orpo"])
def test_tiny_run_trains_and_logs_trl_metrics(tmp_path, loss):
    # One batch of 4 pairs, seen at every step: the loss on it must fall.
    run = {"synthetic_num_pairs": 4, "max_steps": 5, "per_device_train_batch_size": 4, "learning_rate": 5e-3,
           "logging_steps": 1, "pref_beta": 2.0 if loss == "simpo" else 0.1}  # fmt: skip
    results = run_dpo(dpo_config(tmp_path, run, pref_loss=loss, eval_dataset="builtin:synthetic", do_eval=True,
                                 per_device_eval_batch_size=8, add_disco_head=True))  # fmt: skip
    logs = train_logs(tmp_path)
    keys = set().union(*logs)
    assert {"rewards/margins", "logps/chosen", "variance/chosen"} <= keys
    if loss == "orpo":
        assert {"nll_loss", "log_odds_ratio", "log_odds_chosen"} <= keys
    assert logs[-1]["loss"] < logs[0]["loss"]
    assert math.isfinite(results["eval"]["eval_loss"]) and "eval_implicit_accuracy" in results["eval"]


@pytest.mark.parametrize("loss", ["simpo", "orpo"])
def test_pack_pairs_gives_the_same_loss(tmp_path, loss):
    values = []
    for packed in (False, True):
        trainer = build_dpo_trainer(dpo_config(tmp_path / str(packed), {"synthetic_num_pairs": 4,
                                               "per_device_train_batch_size": 4}, pref_loss=loss,
                                               pack_pairs=packed, attn_implementation="eager"))[0]  # fmt: skip
        batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(4)]))
        with torch.no_grad():
            values.append(trainer.compute_loss(trainer.model, batch).item())
        assert trainer.reference_forward_calls == 0
    assert values[0] == pytest.approx(values[1], abs=1e-5)
