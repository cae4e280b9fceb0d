"""Epistemic reward uncertainty: estimators of how far a response lies from what the reward model was trained on.

`base.py` is the protocol every estimator follows (fit once after training, `variance(inputs)`, save / load),
`registry.py` maps the `epistemic:` config values to estimators, one file per estimator beside them. Adding one is
docs/extending.md's second recipe.
"""

from .base import EPISTEMIC_WEIGHTS_NAME, EpistemicEstimator, EpistemicInputs, FitData
from .laplace import LaplacePosterior
from .registry import ESTIMATORS, estimator_class
from .token_novelty import TokenNovelty

__all__ = [
    "EPISTEMIC_WEIGHTS_NAME",
    "ESTIMATORS",
    "EpistemicEstimator",
    "EpistemicInputs",
    "FitData",
    "LaplacePosterior",
    "TokenNovelty",
    "estimator_class",
]
