"""Shared fixtures. Every test runs offline and on tiny models; built models are shared per session."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

# Hidden size 64 gains nothing from a second thread, and one thread per test process stays fast when
# the machine is busy.
torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data`, or skip when the folder is not beside the checkout."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent (it sits beside the checkout in CI and on dev machines)")
    return SHARED_DATA


@pytest.fixture(scope="module")
def tokenizer():
    """The built-in tiny tokenizer, built once per test module (a module's tests may set attributes on it)."""
    from discoalign.models.tiny import build_tiny_tokenizer

    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, str]:
    """Directories holding each built-in tiny model + tokenizer, built once per test session."""
    from discoalign.config.builtin_models import TINY_ARCHS
    from discoalign.models.tiny import write_tiny_model

    root = tmp_path_factory.mktemp("tiny")
    return {arch: write_tiny_model(arch, str(root / arch)) for arch in TINY_ARCHS}


@pytest.fixture(scope="session")
def ref_dir(tmp_path_factory) -> str:
    """A tiny qwen3 built with seed 1: a DPO reference that differs from the policy `builtin:tiny-qwen3` (seed 0),
    so that the margin d != 0 at step 0 and every head gets a gradient."""
    from discoalign.models.tiny import write_tiny_model

    return write_tiny_model("qwen3", str(tmp_path_factory.mktemp("ref") / "qwen3-seed1"), seed=1)


# The files that take longest (torchrun launches, the real-model pull, subprocess runs), slowest first. They run
# before the rest so that under `make test`'s two workers (`--dist loadfile --no-loadscope-reorder`) the short files
# fill in around them, instead of one long file ending the run alone on one core.
SLOW_FIRST = (
    "test_distributed_zero.py", "test_grpo_distributed.py", "test_real_model.py", "test_distributed_fsdp.py",
    "test_distributed.py", "test_ppo_reward_adapter.py", "test_quiet.py", "test_ppo_distributed.py",
    "test_ppo_effect.py", "test_rm_effect.py",
)  # fmt: skip


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))  # stable: the rest keep their order
