"""The epistemic estimators by `epistemic:` config value. The config's allowed values
(`config.finetuning_groups.EPISTEMIC_KINDS`) are `none` plus these names; a test keeps them equal."""

from __future__ import annotations

from ...errors import CheckpointError
from .base import EpistemicEstimator
from .laplace import LaplacePosterior
from .token_novelty import TokenNovelty

ESTIMATORS: dict[str, type[EpistemicEstimator]] = {
    TokenNovelty.kind: TokenNovelty,
    LaplacePosterior.kind: LaplacePosterior,
}


def estimator_class(kind: str, where: str = "") -> type[EpistemicEstimator]:
    """The estimator class of `kind`; CheckpointError naming `where` for an unknown one (a newer checkpoint)."""
    if kind not in ESTIMATORS:
        raise CheckpointError(f"{where}unknown epistemic kind {kind!r}; this version knows {', '.join(ESTIMATORS)}.")
    return ESTIMATORS[kind]
