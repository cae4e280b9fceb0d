"""`builtin:synthetic`: a preference task whose true answer is known.

Each response is a handful of adjectives; each adjective carries a fixed hidden value, and the true reward
of a text is the mean value of its known words. Each prompt names a topic, and each topic flips the
preference label with its own probability. So the *mean* reward depends only on the words (the same
function in every topic) and the label *noise* only on the topic: a Disco reward model can learn a mean
that ranks responses and a variance that tracks the noise of the prompt's topic, and evaluation can score
a reward model or a policy against the truth (`true_reward`).

Deterministic for a seed (Python's `random.Random`, never the global RNG).
"""

from __future__ import annotations

import random
import re
from typing import Any

VOCABULARY: tuple[str, ...] = (
    "bright", "calm", "quick", "gentle", "brave", "clever", "kind", "warm",
    "quiet", "proud", "happy", "eager", "fair", "honest", "lucky", "polite",
    "smooth", "fresh", "clean", "sharp", "soft", "loud", "dull", "cold",
    "rough", "slow", "bitter", "tired", "grumpy", "lazy", "rude", "messy",
    "weak", "noisy", "gloomy", "nasty", "dirty", "clumsy", "cruel", "harsh",
)  # fmt: skip


def _word_values() -> dict[str, float]:
    """Evenly spread values in [-1, 1] (like linspace), dealt to the words in a fixed shuffled order."""
    n = len(VOCABULARY)
    values = [-1.0 + 2.0 * i / (n - 1) for i in range(n)]
    random.Random(20240601).shuffle(values)
    return dict(zip(VOCABULARY, values))


WORD_VALUES: dict[str, float] = _word_values()
TOPICS: tuple[str, ...] = ("science", "history", "music", "travel", "health", "art")
TOPIC_NOISE: dict[str, float] = dict(zip(TOPICS, (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)))
NOUNS: tuple[str, ...] = ("garden", "river", "city", "house", "story", "village", "song", "morning")
RESPONSE_LENGTHS = (4, 5, 6)  # words per response
MIN_REWARD_GAP = 0.05  # pairs closer than this are resampled, so every pair has a true winner

_WORD = re.compile(r"[a-z]+")


def true_reward(text: str) -> float:
    """Mean hidden value of the VOCABULARY words in `text` (case-insensitive); 0.0 when there are none."""
    values = [WORD_VALUES[w] for w in _WORD.findall(text.lower()) if w in WORD_VALUES]
    return sum(values) / len(values) if values else 0.0


def _response(rng: random.Random) -> str:
    return " ".join(rng.sample(VOCABULARY, rng.choice(RESPONSE_LENGTHS)))


def _prompt(topic: str, noun: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Topic: {topic}. Describe a {noun}."}]


# `builtin:synthetic-noisy`: the noisy-label benchmark's regime (benchmarks/dpo_noise.py, docs/noisy_labels.md).
# Eight contexts with flip rates from 0 to 0.45, imbalanced so that most pairs come from noisy contexts: a
# model that trusts every label equally learns the shared word values mostly from unreliable pairs.
NOISY_TOPIC_NOISE: dict[str, float] = {
    "science": 0.0, "history": 0.05, "music": 0.1, "travel": 0.15,
    "health": 0.25, "art": 0.35, "sports": 0.4, "food": 0.45,
}  # fmt: skip
NOISY_TOPIC_WEIGHTS: dict[str, float] = {
    "science": 1.0, "history": 1.0, "music": 1.0, "travel": 1.0,
    "health": 2.0, "art": 2.0, "sports": 3.0, "food": 3.0,
}  # fmt: skip


def synthetic_pair_rows(num_pairs: int, seed: int) -> list[dict[str, Any]]:
    """`num_pairs` canonical conversational rows (see `make_synthetic_pairs`), as plain dicts."""
    return _pair_rows(num_pairs, seed, topic_noise=TOPIC_NOISE, topic_weights=None)


def noisy_synthetic_pair_rows(num_pairs: int, seed: int) -> list[dict[str, Any]]:
    """`builtin:synthetic-noisy`: the same task over NOISY_TOPIC_NOISE's eight contexts, drawn with
    NOISY_TOPIC_WEIGHTS (imbalanced, mostly noisy). Same columns as `synthetic_pair_rows`."""
    return _pair_rows(num_pairs, seed, topic_noise=NOISY_TOPIC_NOISE, topic_weights=NOISY_TOPIC_WEIGHTS)


def _pair_rows(
    num_pairs: int, seed: int, topic_noise: dict[str, float], topic_weights: dict[str, float] | None
) -> list[dict[str, Any]]:
    """Rows over `topic_noise`'s topics; in turn when `topic_weights` is None, else drawn with those weights."""
    rng = random.Random(seed)
    topics = list(topic_noise)
    weights = None if topic_weights is None else [topic_weights[t] for t in topics]
    rows = []
    for i in range(num_pairs):
        if weights is None:
            topic = topics[i % len(topics)]  # topics take turns, so every topic is equally represented
        else:
            topic = rng.choices(topics, weights=weights)[0]
        noun = rng.choice(NOUNS)
        better = _response(rng)
        worse = _response(rng)
        while abs(true_reward(better) - true_reward(worse)) < MIN_REWARD_GAP:
            worse = _response(rng)
        if true_reward(better) < true_reward(worse):
            better, worse = worse, better
        noise = topic_noise[topic]
        if rng.random() < noise:  # label noise: the annotator prefers the worse response
            better, worse = worse, better
        rows.append(pair_row(_prompt(topic, noun), better, worse, noise, topic))
    return rows


def pair_row(prompt: str, better: str, worse: str, noise: float, topic: str) -> dict:
    """One labelled pair of the synthetic task (after any label flip): the row every noise profile writes."""
    return {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": better}],
        "rejected": [{"role": "assistant", "content": worse}],
        "true_reward_chosen": true_reward(better),
        "true_reward_rejected": true_reward(worse),
        "noise": noise,
        "topic": topic,
    }


def make_synthetic_pairs(num_pairs: int, seed: int):
    """A `datasets.Dataset` of `num_pairs` preference pairs, deterministic for `seed`.

    Columns: `prompt`, `chosen`, `rejected` (message lists), `true_reward_chosen`, `true_reward_rejected`
    (of the stored chosen/rejected, after any label-noise swap), `noise` (the topic's flip probability),
    `topic`.
    """
    import datasets

    return datasets.Dataset.from_list(synthetic_pair_rows(num_pairs, seed))
