"""The rule-based reward functions of `discoalign.rewards`, by hand."""

from discoalign.rewards import short_answer, word_count_in_range


def test_word_count_in_range_by_hand():
    completions = ["a b c d", [{"role": "assistant", "content": "a b c d e f g h"}], "a", ""]
    # 4 words: in range; 8: 2 above 6 -> -2/6; 1: 3 below 4 -> -3/6; 0: -4/6
    assert word_count_in_range(completions) == [1.0, -2 / 6, -3 / 6, -4 / 6]


def test_short_answer_by_hand():
    assert short_answer(["w " * 8, "w " * 30, "w " * 36, "w w"]) == [1.0, 1.0, -6 / 30, -6 / 30]
