"""Helpers shared by several test files: the tiny `stage: dpo` config and the readers of a run's logs.

Imported as `from helpers import ...` (pytest puts `tests/`, which has no `__init__.py`, on `sys.path`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import torch

from discoalign.config import RunConfig, build_config

# The keys every tiny text `stage: dpo` test run shares; each file adds its own (data size, batch sizes, steps,
# learning rate) as a layer of `dpo_config`.
DPO_BASE: dict[str, Any] = {
    "stage": "dpo",
    "model_name_or_path": "builtin:tiny-qwen3",
    "dataset": "builtin:synthetic",
    "cutoff_len": 64,
    "save_strategy": "no",
    "do_train": True,
    "use_cpu": True,
    "disable_tqdm": True,
}
# The grid cell that reads every head: DiscoDPO variances and a dynamic beta.
GRID_CELL = {"add_disco_head": True, "disco_pref": True, "add_beta_head": True, "use_dynamic_beta": True}


def dpo_config(output_dir, *layers: Mapping[str, Any], **overrides: Any) -> RunConfig:
    """The built config of `DPO_BASE`, then each of `layers` (a file's own keys), then `overrides`, writing to
    `output_dir`; a later source wins on a shared key."""
    raw: dict[str, Any] = dict(DPO_BASE)
    for layer in layers:
        raw.update(layer)
    return build_config({**raw, "output_dir": str(output_dir), **overrides})


# A three-step reward model on the tiny qwen2 and 32 synthetic pairs.
TINY_RM = {
    "stage": "rm", "model_name_or_path": "builtin:tiny-qwen2", "dataset": "builtin:synthetic",
    "synthetic_num_pairs": 32, "cutoff_len": 48, "per_device_train_batch_size": 8, "per_device_eval_batch_size": 16,
    "max_steps": 3, "learning_rate": 2e-3, "save_strategy": "no", "plot_loss": False,
}  # fmt: skip

# What a short on-policy run (PPO, GRPO) on the tiny model shares: two steps of two micro-batches of four.
RL_BASE = {
    "model_name_or_path": "builtin:tiny-qwen3", "dataset": "builtin:synthetic", "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 2, "max_steps": 2, "logging_steps": 1, "learning_rate": 1.0e-3,
    "per_device_eval_batch_size": 8, "save_strategy": "no", "disable_tqdm": True, "seed": 0, "do_train": True,
    "num_score_samples": 2,
}  # fmt: skip


def rl_config(stage: str, output_dir, *layers: Mapping[str, Any], **overrides: Any) -> RunConfig:
    """The built config of `RL_BASE` for `stage`, then each of `layers`, then `overrides`, writing to `output_dir`."""
    raw: dict[str, Any] = {**RL_BASE, "stage": stage}
    for layer in layers:
        raw.update(layer)
    return build_config({**raw, "output_dir": str(output_dir), **overrides})


def dpo_trainer(output_dir, *layers: Mapping[str, Any], **overrides: Any):
    """The `DPOTrainer` of `dpo_config(output_dir, *layers, **overrides)`, built but not trained."""
    from discoalign.train.dpo.workflow import build_dpo_trainer

    return build_dpo_trainer(dpo_config(output_dir, *layers, **overrides))[0]


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of `module.state_dict()`, to compare weights before and after training."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def record_losses(trainer) -> list[torch.Tensor]:
    """Wrap `trainer.compute_loss` so that every call appends its loss (a detached scalar) to the returned list."""
    losses: list[torch.Tensor] = []
    compute_loss = trainer.compute_loss

    def recording(model, inputs, return_outputs=False, num_items_in_batch=None):
        result = compute_loss(model, inputs, return_outputs, num_items_in_batch)
        losses.append((result[0] if return_outputs else result).detach().clone())
        return result

    trainer.compute_loss = recording
    return losses


def train_recorded(trainer) -> tuple[torch.Tensor, dict[str, torch.Tensor], Any]:
    """Train; return (the loss of each step (steps,), the final backbone weights, the trainer)."""
    losses = record_losses(trainer)
    trainer.train()
    return torch.stack(losses), snapshot(trainer.model.backbone), trainer


def log_history(output_dir) -> list[dict]:
    """The `log_history` of the `trainer_state.json` a run wrote into `output_dir`."""
    with open(os.path.join(output_dir, "trainer_state.json")) as f:
        return json.load(f)["log_history"]


def train_logs(output_dir) -> list[dict]:
    """The training-step entries (those with a `loss`) of the run's log history, in step order."""
    return [entry for entry in log_history(output_dir) if "loss" in entry]


def train_losses(output_dir) -> list[float]:
    """The logged training loss of each logging step of the run in `output_dir`."""
    return [entry["loss"] for entry in train_logs(output_dir)]


def write_yaml(path, values: dict) -> str:
    """Write `values` as a run's flat YAML at `path`; returns the path as a string."""
    import yaml

    with open(path, "w") as f:
        yaml.safe_dump(values, f)
    return str(path)


def scoring_batch(tok) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded prompts and right-padded responses of different lengths, one without EOS:
    (query_ids (2, P), query_mask (2, P), response_ids (2, L), response_mask (2, L) float)."""
    from discoalign.data.prompts import left_pad

    prompts = [tok("Topic: art. Describe a garden.")["input_ids"], tok("Hi")["input_ids"]]
    responses = [tok(" bright calm quick")["input_ids"] + [tok.eos_token_id], tok(" rude")["input_ids"]]
    query_ids, query_mask = left_pad(prompts, tok.pad_token_id)
    width = max(map(len, responses))
    response_ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in responses])
    response_mask = torch.tensor([[1.0] * len(r) + [0.0] * (width - len(r)) for r in responses])
    return query_ids, query_mask, response_ids, response_mask


# ---- HTTP servers on 127.0.0.1 (test_serve, test_serve_network, test_chat) ------------------------------------

HTTP_TIMEOUT = TIMEOUT = 60  # seconds per HTTP call: generous for a busy 2-core machine, but bounded


class Server:
    """uvicorn in a thread, on a socket the OS bound to a free port of 127.0.0.1. `header_timeout`: serve with
    `discoalign serve`'s protocol (`serve.protocol`), which disconnects clients slow with their headers."""

    def __init__(self, app, header_timeout: float | None = None) -> None:
        import socket
        import threading
        import time

        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        extra = {}
        if header_timeout is not None:
            from discoalign.serve.protocol import timed_h11_protocol

            extra["http"] = timed_h11_protocol(header_timeout)
        config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_keep_alive=5, backlog=512, **extra)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                self.stop()
                raise RuntimeError("the test server did not start within 30 s")
            time.sleep(0.02)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()


def call(url: str, body=None, method: str = "POST", raw: bytes | None = None, headers: dict | None = None):
    """(status, JSON body) of one HTTP request with urllib; errors come back as their status and JSON body."""
    import urllib.error
    import urllib.request

    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
