"""Noise profiles of `builtin:synthetic-noisy:<profile>` (docs/data.md, docs/noisy_labels.md).

The same task as `builtin:synthetic` (responses are adjectives with hidden values, the true reward is their mean);
a profile decides how often each pair's label is flipped, and every row carries its true flip probability in
`noise`, so a benchmark can compute oracles and correlations:

* `imbalanced` (the default, `builtin:synthetic-noisy`): eight topics with flip rates 0 ... 0.45, drawn 1:1:1:1:2:2:3:3
  (mean 0.29). Exactly the rows the name produced before profiles existed.
* `mostly_clean`: flip rate <= 0.1 in seven topics, one noisy topic (0.4), drawn uniformly (mean 0.094).
* `uniform`: the same rate, 0.2, in every topic (a context-dependent method must do no harm).
* `margin`: Bradley–Terry-like, `P(flip) = sigmoid(-k_t * gap)` with `gap` the true reward gap of the pair and a
  sharpness `k_t` per topic: flips are likelier for close pairs, and the topics differ in their mean rate.
* `hidden`: no `Topic:` line; the prompt is `Describe a <noun>.` and the flip rate depends on the noun (the eight
  nouns get `imbalanced`'s rates and weights): the noise is not announced, only readable from what is described.

Deterministic for a seed (`random.Random`, never the global RNG).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

from .synthetic import (
    MIN_REWARD_GAP,
    NOISY_TOPIC_NOISE,
    NOISY_TOPIC_WEIGHTS,
    NOUNS,
    _prompt,
    _response,
    noisy_synthetic_pair_rows,
    pair_row,
    true_reward,
)

DEFAULT_PROFILE = "imbalanced"
NOISY_TOPICS: tuple[str, ...] = tuple(NOISY_TOPIC_NOISE)


@dataclass(frozen=True)
class NoiseProfile:
    """rates: context -> flip rate (for `margin`: context -> sharpness k of sigmoid(-k gap)); weights: context ->
    sampling weight; contexts are topics, or nouns when `hidden`; `margin`: the rate depends on the pair's gap."""

    rates: dict[str, float]
    weights: dict[str, float]
    margin: bool = False
    hidden: bool = False


_UNIFORM_WEIGHTS = dict.fromkeys(NOISY_TOPICS, 1.0)
PROFILES: dict[str, NoiseProfile] = {
    "imbalanced": NoiseProfile(NOISY_TOPIC_NOISE, NOISY_TOPIC_WEIGHTS),
    "mostly_clean": NoiseProfile(
        dict(zip(NOISY_TOPICS, (0.0, 0.02, 0.04, 0.05, 0.06, 0.08, 0.1, 0.4))), _UNIFORM_WEIGHTS
    ),
    "uniform": NoiseProfile(dict.fromkeys(NOISY_TOPICS, 0.2), _UNIFORM_WEIGHTS),
    "margin": NoiseProfile(
        dict(zip(NOISY_TOPICS, (40.0, 20.0, 12.0, 8.0, 5.0, 3.0, 1.5, 0.5))), _UNIFORM_WEIGHTS, margin=True
    ),  # fmt: skip
    "hidden": NoiseProfile(
        dict(zip(NOUNS, NOISY_TOPIC_NOISE.values())), dict(zip(NOUNS, NOISY_TOPIC_WEIGHTS.values())), hidden=True
    ),
}


def flip_probability(profile: NoiseProfile, context: str, gap: float) -> float:
    """The true probability that a pair of context `context` and true reward gap `gap` (> 0) is flipped."""
    rate = profile.rates[context]
    return 1.0 / (1.0 + math.exp(rate * gap)) if profile.margin else rate


def profile_rows(num_pairs: int, seed: int, profile: str = DEFAULT_PROFILE) -> list[dict[str, Any]]:
    """`num_pairs` rows of `builtin:synthetic-noisy:<profile>`; `imbalanced` is today's generator, unchanged.

    Columns as `synthetic_pair_rows`; `topic` is the row's context (the noun for `hidden`, where the prompt does not
    name it), `noise` its true flip probability.
    """
    if profile not in PROFILES:
        raise KeyError(profile)
    if profile == DEFAULT_PROFILE:
        return noisy_synthetic_pair_rows(num_pairs, seed)
    spec = PROFILES[profile]
    rng = random.Random(seed)
    contexts = list(spec.rates)
    weights = [spec.weights[c] for c in contexts]
    rows = []
    for _ in range(num_pairs):
        context = rng.choices(contexts, weights=weights)[0]
        if spec.hidden:
            topic, noun = context, context
            prompt = [{"role": "user", "content": f"Describe a {noun}."}]
        else:
            topic, noun = context, rng.choice(NOUNS)
            prompt = _prompt(topic, noun)
        better, worse = _response(rng), _response(rng)
        while abs(true_reward(better) - true_reward(worse)) < MIN_REWARD_GAP:
            worse = _response(rng)
        if true_reward(better) < true_reward(worse):
            better, worse = worse, better
        noise = flip_probability(spec, context, true_reward(better) - true_reward(worse))
        if rng.random() < noise:  # label noise: the annotator prefers the worse response
            better, worse = worse, better
        rows.append(pair_row(prompt, better, worse, noise, topic))
    return rows
