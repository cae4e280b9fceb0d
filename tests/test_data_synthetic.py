"""builtin:synthetic: fixed word values, topic noise, determinism, and the invariants the effect experiments rely on."""

from __future__ import annotations

from collections import defaultdict

import pytest

from discoalign.config.schema import DataArguments
from discoalign.data import get_dataset
from discoalign.data.synthetic import (
    MIN_REWARD_GAP,
    TOPIC_NOISE,
    TOPICS,
    VOCABULARY,
    WORD_VALUES,
    make_synthetic_pairs,
    synthetic_pair_rows,
    true_reward,
)
from discoalign.models.tiny import build_tiny_tokenizer


def test_vocabulary_and_values_are_spread_evenly():
    assert 36 <= len(VOCABULARY) <= 44 and len(set(VOCABULARY)) == len(VOCABULARY)
    assert all(w.isalpha() and w.islower() for w in VOCABULARY)
    n = len(VOCABULARY)
    assert sorted(WORD_VALUES.values()) == pytest.approx([-1 + 2 * i / (n - 1) for i in range(n)])
    # shuffled: not in vocabulary order
    assert [WORD_VALUES[w] for w in VOCABULARY] != sorted(WORD_VALUES.values())
    assert list(TOPIC_NOISE.values()) == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5] and tuple(TOPIC_NOISE) == TOPICS


def test_true_reward_is_the_mean_of_known_words():
    a, b = VOCABULARY[0], VOCABULARY[1]
    assert true_reward(f"{a} {b}") == pytest.approx((WORD_VALUES[a] + WORD_VALUES[b]) / 2)
    # case-insensitive, punctuation and unknown words ignored
    assert true_reward(f"The {a.upper()}, truly {a}!") == pytest.approx(WORD_VALUES[a])
    assert true_reward("nothing known here") == 0.0
    assert true_reward("") == 0.0


def test_deterministic_for_a_seed():
    assert synthetic_pair_rows(50, seed=7) == synthetic_pair_rows(50, seed=7)
    assert synthetic_pair_rows(50, seed=7) != synthetic_pair_rows(50, seed=8)
    assert make_synthetic_pairs(10, 3).to_list() == synthetic_pair_rows(10, 3)


def test_rows_carry_consistent_ground_truth():
    rows = synthetic_pair_rows(600, seed=0)
    for row in rows:
        topic = row["topic"]
        assert row["prompt"] == [{"role": "user", "content": row["prompt"][0]["content"]}]
        assert row["prompt"][0]["content"].startswith(f"Topic: {topic}. Describe a ")
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        assert 4 <= len(chosen.split()) <= 6 and 4 <= len(rejected.split()) <= 6
        assert set(chosen.split()) <= set(VOCABULARY)
        assert row["true_reward_chosen"] == true_reward(chosen)
        assert row["true_reward_rejected"] == true_reward(rejected)
        assert abs(row["true_reward_chosen"] - row["true_reward_rejected"]) >= MIN_REWARD_GAP
        assert row["noise"] == TOPIC_NOISE[topic]
        if topic == TOPICS[0]:  # the noiseless topic never flips a label
            assert row["true_reward_chosen"] > row["true_reward_rejected"]
    assert {row["topic"] for row in rows} == set(TOPICS)


def test_label_flip_rate_tracks_topic_noise():
    flips, counts = defaultdict(int), defaultdict(int)
    for row in synthetic_pair_rows(6000, seed=1):
        counts[row["topic"]] += 1
        flips[row["topic"]] += row["true_reward_chosen"] < row["true_reward_rejected"]
    for topic, noise in TOPIC_NOISE.items():
        assert counts[topic] == 1000
        # binomial standard error <= 0.016 at n=1000: 0.05 is over 3 sigma
        assert abs(flips[topic] / counts[topic] - noise) < 0.05, topic


def test_builtin_in_config_uses_num_pairs_and_held_out_seed_for_eval():
    tok = build_tiny_tokenizer()
    args = DataArguments(
        dataset="builtin:synthetic", eval_dataset="builtin:synthetic", synthetic_num_pairs=20, synthetic_seed=4
    )
    bundle = get_dataset(args, tok, "rm", seed=0)
    assert len(bundle.train) == 20 and len(bundle.eval) == 20
    assert bundle.train["chosen"] == [r["chosen"] for r in synthetic_pair_rows(20, 4)]
    assert bundle.eval["chosen"] == [r["chosen"] for r in synthetic_pair_rows(20, 5)]
    assert bundle.train["true_reward_chosen"] == [r["true_reward_chosen"] for r in synthetic_pair_rows(20, 4)]
    assert bundle.train["topic"][:6] == list(TOPICS)
