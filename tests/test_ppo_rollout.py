"""Rollout mechanics: left padding, cutting responses at the first stop token, where the reward is read, and
that the log-probs PPO computes are those of the distribution generation sampled from."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig

from discoalign.config.schema import FinetuningArguments, ModelArguments
from discoalign.data.prompts import PromptSchedule, left_pad
from discoalign.models.generation import stop_token_ids, truncate_at_stop
from discoalign.models.loader import load_model_with_heads
from discoalign.models.reward_model import reward_token_index, score_responses
from discoalign.train.ppo.rollout import response_hidden, token_logprobs

EOS, PAD = 2, 0


def test_left_pad():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_token_id=PAD)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_truncate_at_stop_with_different_lengths_with_and_without_eos():
    generated = torch.tensor(
        [
            [5, 6, EOS, 9, 9],  # stops after 3 tokens; what follows the EOS is discarded
            [7, 8, 9, 10, 11],  # never stops: cut off by max_new_tokens
            [EOS, PAD, PAD, PAD, PAD],  # stops at once
            [5, EOS, EOS, 6, EOS],  # only the first EOS counts
        ]
    )
    responses, mask, ended = truncate_at_stop(generated, [EOS], PAD)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]]
    assert ended.tolist() == [True, False, True, True]
    assert responses.tolist() == [[5, 6, EOS, PAD, PAD], [7, 8, 9, 10, 11], [EOS, PAD, PAD, PAD, PAD],
                                  [5, EOS, PAD, PAD, PAD]]  # fmt: skip
    # Where the reward is read: prompts left-padded to P = 3, so row b's reward sits at 3 + len_b - 1.
    query_mask = torch.tensor([[1, 1, 1], [0, 1, 1], [0, 0, 1], [1, 1, 1]])
    assert reward_token_index(query_mask, mask).tolist() == [5, 7, 3, 4]


def test_pad_equal_to_eos_keeps_the_ending_eos_and_not_the_padding():
    # generate() writes pad (== EOS here) after a finished row; the end must come from the first EOS only.
    generated = torch.tensor([[5, 6, EOS, EOS, EOS], [5, 6, 7, 8, EOS], [5, 6, 7, 8, 9]])
    responses, mask, ended = truncate_at_stop(generated, [EOS], pad_token_id=EOS)
    assert mask.sum(1).tolist() == [3, 5, 5]
    assert ended.tolist() == [True, True, False]
    assert reward_token_index(torch.ones(3, 2, dtype=torch.long), mask).tolist() == [4, 6, 6]
    assert responses[0].tolist() == [5, 6, EOS, EOS, EOS]


def test_several_stop_tokens():
    responses, mask, ended = truncate_at_stop(torch.tensor([[5, 9, 6, EOS]]), [EOS, 9], PAD)
    assert mask.tolist() == [[1, 1, 0, 0]] and ended.tolist() == [True]
    tok = type("Tok", (), {"eos_token_id": 2})()
    assert stop_token_ids(tok, GenerationConfig(eos_token_id=[2, 7])) == [2, 7]


@pytest.fixture(scope="module")
def tiny_rm():
    """A tiny reward model with random (non-zero) value and variance heads."""
    torch.manual_seed(0)
    model, tok = load_model_with_heads(
        ModelArguments(model_name_or_path="builtin:tiny-llama"), FinetuningArguments(add_disco_head=True),
        add_value_head=True, is_trainable=False,
    )  # fmt: skip
    with torch.no_grad():
        model.variance_head.summary.weight.normal_(0, 0.1)
    return model, tok


def test_reward_is_read_at_the_last_generated_token(tiny_rm):
    model, _ = tiny_rm
    prompts = [[11, 12, 13], [14, 15]]
    responses = [[20, 21, 22, EOS], [23, 24]]  # the second was cut off without EOS
    query_ids, query_mask = left_pad(prompts, PAD)
    width = max(len(r) for r in responses)
    response_ids = torch.tensor([r + [PAD] * (width - len(r)) for r in responses])
    response_mask = torch.tensor([[1.0] * len(r) + [0.0] * (width - len(r)) for r in responses])
    mean, variance = score_responses(model, query_ids, query_mask, response_ids, response_mask)
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        alone = torch.tensor([prompt + response])  # no padding at all: the last token is the last generated one
        m, v = model.score(alone, torch.ones_like(alone))
        torch.testing.assert_close(mean[i], m[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(variance[i], v[0], atol=1e-5, rtol=1e-5)
        # and not at a pad token: scoring one more (pad) position gives another number
        padded = torch.tensor([prompt + response + [PAD]])
        m_pad, _ = model.score(padded, torch.ones_like(padded))
        assert not torch.allclose(m_pad[0], mean[i], atol=1e-4)


def test_logprobs_equal_those_of_the_sampling_distribution(tiny_rm):
    """With left-padded prompts and temperature 0.7, the log-probs read from one forward pass equal
    log_softmax(logits / T) of the scores `generate` sampled from."""
    model, tok = tiny_rm
    prompts = [tok("Topic: art. Describe a garden.")["input_ids"], tok("Hello")["input_ids"]]
    query_ids, query_mask = left_pad(prompts, tok.pad_token_id)
    config = GenerationConfig(do_sample=True, max_new_tokens=6, temperature=0.7, top_k=0, top_p=1.0,
                              eos_token_id=[-1], pad_token_id=tok.pad_token_id)  # fmt: skip
    torch.manual_seed(3)
    out = model.backbone.generate(input_ids=query_ids, attention_mask=query_mask, generation_config=config,
                                  output_logits=True, return_dict_in_generate=True)  # fmt: skip
    responses = out.sequences[:, query_ids.shape[1] :]
    expected = torch.stack(
        [torch.log_softmax(logits.float() / 0.7, -1).gather(-1, responses[:, i : i + 1]).squeeze(-1)
         for i, logits in enumerate(out.logits)], dim=1,
    )  # fmt: skip
    input_ids = torch.cat([query_ids, responses], 1)
    mask = torch.cat([query_mask, torch.ones_like(responses)], 1)
    with torch.no_grad():
        hidden = response_hidden(model.hidden_states(input_ids, mask), query_ids.shape[1])
        logprobs, entropy = token_logprobs(hidden, model.lm_head, responses, temperature=0.7, with_entropy=True)
    torch.testing.assert_close(logprobs, expected, atol=1e-4, rtol=1e-4)
    assert (entropy > 0).all()


def test_prompt_schedule_is_seeded_and_shards_disjointly():
    a = PromptSchedule(num_rows=20, batch_size=3, seed=5, num_processes=2, process_index=0)
    b = PromptSchedule(num_rows=20, batch_size=3, seed=5, num_processes=2, process_index=1)
    assert a.steps_per_epoch == 3  # 20 // (3 * 2); the incomplete global batch is dropped
    for step in range(3):
        assert not set(a.indices(step)) & set(b.indices(step))
    epoch0 = {i for s in range(3) for i in a.indices(s) + b.indices(s)}
    assert len(epoch0) == 18
    assert a.indices(4) == PromptSchedule(20, 3, 5, 2, 0).indices(4)  # replayable: same step, same prompts
    assert a.indices(0) != a.indices(3)  # a new epoch is a new permutation
    assert PromptSchedule(2, 3, 0).steps_per_epoch == 0
