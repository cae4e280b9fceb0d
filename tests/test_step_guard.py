"""A regression guard for the DPO step that times nothing: it counts what one step does.

One training step (forward, loss, backward) on the tiny model, watched by module hooks and a `TorchDispatchMode`:

* forward passes of the backbone: exactly one policy pass with autograd on, and one reference pass with autograd
  off and under `torch.inference_mode` (none with precomputed reference log-probs);
* the largest tensor any op allocates, and the most rows any vocabulary-wide tensor has: never more than one
  chunk of scored tokens (`logps_chunk_size`) is projected through the LM head at a time, so a full-vocabulary
  log-softmax over every position (the plain path, `logps_chunk_size: 0`) fails it.

The self-tests at the end make the step worse on purpose (the reference pass grad-tracking, a second reference
pass, the full log-softmax) and check that the guard fails on each. `make bench-quick` times the same step.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import pytest
import torch
from helpers import dpo_trainer
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

CHUNK = 16  # small, so that chunking is exercised at the tiny model's lengths
RUN = {"synthetic_num_pairs": 8, "per_device_train_batch_size": 4, "logps_chunk_size": CHUNK, "pref_beta": 0.5}


@dataclass
class Pass:
    """One forward of a backbone: who ran it and under which autograd state."""

    role: str  # "policy" or "reference" (the module object it ran on; with LoRA both are the policy's)
    grad_enabled: bool
    inference_mode: bool
    output_requires_grad: bool


@dataclass
class StepReport:
    passes: list[Pass] = field(default_factory=list)
    largest_bytes: int = 0
    largest: str = ""
    vocab_rows: int = 0  # the most rows (numel / vocab) of any tensor whose last dim is the vocabulary
    vocab_op: str = ""
    scored_tokens: int = 0  # response tokens of the batch (labels != -100)


class AllocationWatch(TorchDispatchMode):
    """Every op's outputs: the largest new storage, and the largest vocabulary-wide tensor."""

    def __init__(self, report: StepReport, vocab: int) -> None:
        super().__init__()
        self.report, self.vocab = report, vocab

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {_storage(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or _storage(t) in inputs:
                continue  # a view (or an in-place result) of an input: nothing allocated
            size = t.untyped_storage().nbytes()
            if size > self.report.largest_bytes:
                self.report.largest_bytes, self.report.largest = size, f"{func} {tuple(t.shape)} {t.dtype}"
            if t.dim() >= 1 and t.shape[-1] == self.vocab:
                if t.numel() // self.vocab > self.report.vocab_rows:
                    self.report.vocab_rows = t.numel() // self.vocab
                    self.report.vocab_op = f"{func} {tuple(t.shape)} {t.dtype}"
        return out


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def watched_step(trainer, rows) -> StepReport:
    """One `training_step` (forward, loss, backward) of `trainer` on `rows`, watched."""
    report = StepReport()
    policy = trainer._policy()
    roles = {id(policy.decoder): "policy"}
    if trainer.ref_model is not None:
        roles[id(trainer.accelerator.unwrap_model(trainer.ref_model).decoder)] = "reference"

    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state
        grad_on = torch.is_grad_enabled()
        role = roles[id(module)] if len(roles) > 1 else ("policy" if grad_on else "reference")
        report.passes.append(Pass(role, grad_on, torch.is_inference_mode_enabled(), hidden.requires_grad))

    decoders = {id(policy.decoder): policy.decoder}
    if trainer.ref_model is not None:
        ref_decoder = trainer.accelerator.unwrap_model(trainer.ref_model).decoder
        decoders[id(ref_decoder)] = ref_decoder
    handles = [m.register_forward_hook(hook) for m in decoders.values()]
    batch = trainer._prepare_inputs(trainer.data_collator(rows))
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    try:
        with AllocationWatch(report, policy.config.get_text_config().vocab_size):
            trainer.training_step(trainer.model, batch)
    finally:
        for h in handles:
            h.remove()
    report.scored_tokens = int((batch["labels"][:, 1:] != -100).sum())
    return report


def parameter_bytes(trainer) -> int:
    return max(p.untyped_storage().nbytes() for p in trainer._policy().parameters())


def check_step(report: StepReport, trainer, reference_passes: int) -> None:
    """The guard. Fails with a message naming what changed."""
    policy = [p for p in report.passes if p.grad_enabled]
    reference = [p for p in report.passes if not p.grad_enabled]
    assert len(policy) == 1 and policy[0].output_requires_grad, f"policy passes with autograd: {report.passes}"
    assert len(reference) == reference_passes, f"expected {reference_passes} reference pass(es): {report.passes}"
    for p in reference:
        assert p.inference_mode and not p.output_requires_grad, (
            f"reference pass tracked by autograd (or not under inference_mode): {p}"
        )
    rows = min(CHUNK, report.scored_tokens)
    assert report.vocab_rows <= rows, (
        f"a vocabulary-wide tensor of {report.vocab_rows} rows (> {rows}: one chunk of scored tokens; "
        f"{report.vocab_op}): "
        "a full-vocabulary log-softmax is back"
    )
    # Nothing bigger than a weight (the largest is the embedding, V x H) or one chunk of fp32 logits.
    vocab = trainer._policy().config.get_text_config().vocab_size
    bound = max(parameter_bytes(trainer), rows * vocab * 4)
    assert report.largest_bytes <= bound, f"largest tensor {report.largest_bytes} B > {bound} B: {report.largest}"


def rows_of(trainer, n=4):
    return [trainer.train_dataset[i] for i in range(n)]


@pytest.fixture(scope="module")
def live(tmp_path_factory, ref_dir):
    return dpo_trainer(tmp_path_factory.mktemp("guard_live"), RUN, ref_model_name_or_path=ref_dir)


@pytest.mark.parametrize("pack_pairs", [False, True])
def test_live_reference_step(tmp_path, ref_dir, pack_pairs):
    trainer = dpo_trainer(tmp_path, RUN, ref_model_name_or_path=ref_dir, pack_pairs=pack_pairs)
    report = watched_step(trainer, rows_of(trainer))
    check_step(report, trainer, reference_passes=1)
    assert report.passes[0].role == "reference" and report.passes[1].role == "policy"


def test_lora_step(tmp_path):
    trainer = dpo_trainer(tmp_path, RUN, finetuning_type="lora", lora_rank=4)
    check_step(watched_step(trainer, rows_of(trainer)), trainer, reference_passes=1)


def test_precomputed_step(tmp_path, ref_dir):
    trainer = dpo_trainer(tmp_path, RUN, ref_model_name_or_path=ref_dir, precompute_ref_logps=True)
    check_step(watched_step(trainer, rows_of(trainer)), trainer, reference_passes=0)


# ---- the guard catches what it is for -------------------------------------------------------------------


def test_guard_catches_grad_tracking_reference(live):
    live.reference_grad_off = contextlib.nullcontext  # the reference pass with autograd on
    try:
        with pytest.raises(AssertionError, match="reference pass|policy passes"):
            check_step(watched_step(live, rows_of(live)), live, reference_passes=1)
    finally:
        live.reference_grad_off = torch.inference_mode


def test_guard_catches_no_grad_instead_of_inference_mode(live):
    live.reference_grad_off = torch.no_grad
    try:
        with pytest.raises(AssertionError, match="tracked by autograd"):
            check_step(watched_step(live, rows_of(live)), live, reference_passes=1)
    finally:
        live.reference_grad_off = torch.inference_mode


def test_guard_catches_second_reference_pass(live, monkeypatch):
    original = live.reference_forward

    def twice(inputs):
        original(inputs)
        return original(inputs)

    monkeypatch.setattr(live, "reference_forward", twice)
    with pytest.raises(AssertionError, match="reference pass"):
        check_step(watched_step(live, rows_of(live)), live, reference_passes=1)


def test_guard_catches_full_vocabulary_log_softmax(live, monkeypatch):
    monkeypatch.setattr(live, "logps_chunk_size", 0)  # the plain path: one fp32 log-softmax over every position
    with pytest.raises(AssertionError, match="full-vocabulary log-softmax"):
        check_step(watched_step(live, rows_of(live)), live, reference_passes=1)
