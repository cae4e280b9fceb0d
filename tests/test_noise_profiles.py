"""Issue 21: `builtin:synthetic-noisy:<profile>`: each profile flips labels at its stated rates (binomial tolerance),
every row carries its true flip rate, and the default is today's data, unchanged."""

from __future__ import annotations

import collections
import hashlib
import json
import math

import pytest

from discoalign.data.sources import read_spec
from discoalign.data.synthetic import noisy_synthetic_pair_rows, true_reward
from discoalign.data.synthetic_noise import PROFILES, flip_probability, profile_rows
from discoalign.errors import DataError

# sha256 of json.dumps(rows, sort_keys=True) of the generator before profiles existed (main at d925571).
TODAY = {
    (200, 0): "b47cac46f24af20221dbbe32986d8ecd49331ffd93d6295999a3655fa044d88a",
    (300, 1001): "b837602646b39022e8ddb8b1cc472b6c3f839a8d55ec703542e5b4744d251b7e",
}


def _digest(rows) -> str:
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()


@pytest.mark.parametrize(("n", "seed"), sorted(TODAY))
def test_default_profile_is_todays_data(n, seed):
    assert _digest(noisy_synthetic_pair_rows(n, seed)) == TODAY[(n, seed)]
    assert _digest(profile_rows(n, seed)) == TODAY[(n, seed)]
    assert _digest(profile_rows(n, seed, "imbalanced")) == TODAY[(n, seed)]
    (plain,) = read_spec("builtin:synthetic-noisy", n, seed)
    (named,) = read_spec("builtin:synthetic-noisy:imbalanced", n, seed)
    assert _digest(plain.rows) == _digest(named.rows) == TODAY[(n, seed)]


def _flipped(row) -> bool:
    return row["true_reward_chosen"] < row["true_reward_rejected"]


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_empirical_flip_rate_per_context_matches_the_profile(profile):
    rows = profile_rows(6000, 3, profile)
    by_context = collections.defaultdict(list)
    for row in rows:
        by_context[row["topic"]].append(row)
        # the stored true rewards are those of the stored texts, and `noise` is the row's true flip probability
        assert row["true_reward_chosen"] == true_reward(row["chosen"][0]["content"])
        gap = abs(row["true_reward_chosen"] - row["true_reward_rejected"])
        assert row["noise"] == pytest.approx(flip_probability(PROFILES[profile], row["topic"], gap))
    assert set(by_context) == set(PROFILES[profile].rates)
    for context, group in by_context.items():
        expected = sum(r["noise"] for r in group) / len(group)  # E[flip] given the rows' own probabilities
        observed = sum(map(_flipped, group)) / len(group)
        sd = math.sqrt(max(expected * (1 - expected), 1e-9) / len(group))
        assert abs(observed - expected) <= 4 * sd + 1e-12, (profile, context, observed, expected)
        if not PROFILES[profile].margin:
            assert {r["noise"] for r in group} == {PROFILES[profile].rates[context]}


def test_profile_shapes():
    clean = PROFILES["mostly_clean"].rates
    assert sum(rate > 0.1 for rate in clean.values()) == 1 and max(clean.values()) == 0.4
    assert set(PROFILES["uniform"].rates.values()) == {0.2}
    # margin: flips likelier for close pairs (BT-like), within every context
    margin = PROFILES["margin"]
    for context in margin.rates:
        assert flip_probability(margin, context, 0.05) > flip_probability(margin, context, 0.5)
    # hidden: the prompt names no topic; the context is the noun described
    for row in profile_rows(50, 0, "hidden"):
        text = row["prompt"][0]["content"]
        assert "Topic" not in text and text == f"Describe a {row['topic']}."


def test_profiles_are_deterministic_and_differ():
    assert profile_rows(100, 5, "margin") == profile_rows(100, 5, "margin")
    assert profile_rows(100, 5, "uniform") != profile_rows(100, 6, "uniform")


def test_unknown_profile_is_a_data_error_naming_it():
    with pytest.raises(DataError, match=r"Unknown noise profile 'nope'.*imbalanced, mostly_clean"):
        read_spec("builtin:synthetic-noisy:nope", 10, 0)
