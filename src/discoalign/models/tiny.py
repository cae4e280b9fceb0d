"""Tiny random models and a locally trained tokenizer, built fully offline (`builtin:tiny-<arch>`).

Everything here is deterministic: the same arch and seed give the same weights bit for bit, and the
tokenizer is the same on every machine. That lets a LoRA checkpoint whose base is `builtin:tiny-<arch>`
be reloaded exactly by rebuilding the base instead of storing it.
"""

from __future__ import annotations

import functools
import os

import torch

from ..config.builtin_models import TINY_ARCHS, TINY_SEQ2SEQ_ARCHS
from ..data import synthetic

PAD_TOKEN = "<|endoftext|>"  # also bos and unk
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"  # eos: a ChatML turn ends a response
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END)

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# A fixed vocabulary size keeps the model's weight shapes (and so its random init) independent of the
# corpus: the synthetic task's word list may grow without changing any tiny model's weights.
TINY_VOCAB_SIZE = 1024

TINY_HIDDEN = 64
TINY_LAYERS = 2
TINY_HEADS = 4
TINY_KV_HEADS = 2
TINY_INTERMEDIATE = 128
TINY_MAX_POSITIONS = 512

_GENERIC_ENGLISH = """
The quick brown fox jumps over the lazy dog. A good answer is short, correct and kind.
You are a helpful assistant. Please answer the question below in one or two sentences.
What is the capital of France? The capital of France is Paris. How many days are in a week?
There are seven days in a week. Write a poem about the sea. The sea is wide and blue and deep.
Explain why the sky is blue. Sunlight is scattered by the air, and blue light scatters the most.
Tell me a story about a cat who lived in a small house near the river with an old man and his dog.
I think that this response is better than the other one because it is more helpful and honest.
Thank you for your question. Here is a list of steps: first, read the text; second, write a summary;
third, check the summary for mistakes. Numbers: zero one two three four five six seven eight nine ten
0 1 2 3 4 5 6 7 8 9 10 100 1000 2024. Sorry, I cannot help with that request, but I can help with another.
Human: Can you help me? Assistant: Of course, I would be happy to help you with anything you need.
The model should prefer the chosen response and reject the rejected response with a clear margin.
Reward models learn to score answers; a higher reward means people liked the answer more.
Good morning, good evening, hello, goodbye, yes, no, maybe, always, never, sometimes, often, rarely.
She said that they would come back tomorrow, but he was not sure whether it was true or false.
Water, fire, earth, air, food, music, science, history, math, language, travel, health, sport, art.
Which of these is the best way to learn: reading books, watching videos, or practicing every day?
Practice makes perfect. Simple and clear writing is easier to read than long and complex writing.
system user assistant instruction input output question answer response prompt chosen rejected
Every morning the farmer walked to the market to sell apples, bread, cheese, eggs, honey and milk.
Scientists measure temperature, pressure, distance, speed, weight and time with careful instruments.
The children played football in the garden while their parents cooked dinner in the kitchen.
Computers store information as numbers; programs describe the steps a computer should follow.
If you want to improve your health, sleep well, drink water, eat vegetables and exercise regularly.
The history of the world includes many empires, wars, inventions, discoveries and revolutions.
Doctors, teachers, engineers, lawyers, artists, writers and farmers all work hard in different ways.
Mountains are higher than hills; oceans are larger than lakes; forests contain many kinds of trees.
Please summarize the following paragraph, translate it into French, and then explain the main idea.
My favourite colours are red, orange, yellow, green, purple, white, black, brown, pink and grey.
Monday Tuesday Wednesday Thursday Friday Saturday Sunday January February March April May June July
August September October November December spring summer autumn winter north south east west.
Although the journey was difficult, the travellers finally reached the village before the storm began.
An honest assistant admits uncertainty, avoids harmful advice, and gives reasons for its conclusions.
Mathematics studies numbers, shapes, patterns, equations, probability, statistics and functions.
Preference data contains pairs of responses where people chose the better one for each prompt.
"""


def _words_of(obj) -> list[str]:
    """Every string inside `obj` (a str, or nested lists/tuples/sets/dicts of them)."""
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [w for k, v in obj.items() for w in _words_of(k) + _words_of(v)]
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [w for item in obj for w in _words_of(item)]
    return []


def _task_words() -> list[str]:
    """Words of the synthetic task (its VOCABULARY, plus TOPICS and NOUNS when it has them), sorted."""
    return sorted(set(_words_of([synthetic.VOCABULARY, synthetic.TOPICS, synthetic.NOUNS])))


def _corpus() -> list[str]:
    """Training text for the BPE merges; its order is fixed so training is deterministic."""
    task = _task_words()
    lines = [line.strip() for line in _GENERIC_ENGLISH.strip().splitlines()]
    # Task words appear both alone and with a leading space, the way they occur inside sentences; repeated
    # so that BPE merges them into whole tokens (short sequences keep the tests fast).
    lines += [" ".join(task), " ".join(w.capitalize() for w in task)] * 4
    lines += ["Topic: . Describe a"] * 4
    lines += [f"{IM_START}{role}\n" for role in ("system", "user", "assistant")]
    return lines


# Qwen2's pre-tokenizer split. Using exactly Qwen2's pipeline (NFC, this split, byte-level without its own
# regex, no post-processor) matters: `AutoTokenizer` rebuilds a saved qwen2 model's tokenizer as
# `Qwen2Tokenizer` from vocab + merges alone, and only an identical pipeline then gives identical ids.
_PRETOKENIZE_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    if tok.get_vocab_size() != TINY_VOCAB_SIZE:  # the corpus is too small to reach it: a bug here, not a user error
        raise RuntimeError(f"tiny tokenizer has {tok.get_vocab_size()} tokens, expected {TINY_VOCAB_SIZE}")
    return tok.to_str()


def build_tiny_tokenizer():
    """A byte-level BPE tokenizer (~1k tokens) trained offline, with ChatML specials and chat template.

    Returns a fresh `PreTrainedTokenizerFast` each call (tokenizers are mutable). pad = bos = unk =
    `<|endoftext|>`, eos = `<|im_end|>`, padding on the right.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        bos_token=PAD_TOKEN,
        unk_token=PAD_TOKEN,
        pad_token=PAD_TOKEN,
        eos_token=IM_END,
        additional_special_tokens=[IM_START],
        padding_side="right",
        chat_template=CHAT_TEMPLATE,
        model_max_length=TINY_MAX_POSITIONS,
    )


def tiny_decoder_kwargs(vocab_size: int, pad_token_id: int, bos_token_id: int, eos_token_id: int) -> dict:
    """Config keys of the tiny Llama-style decoder shared by the text and multimodal built-in models."""
    return dict(
        vocab_size=vocab_size,
        hidden_size=TINY_HIDDEN,
        intermediate_size=TINY_INTERMEDIATE,
        num_hidden_layers=TINY_LAYERS,
        num_attention_heads=TINY_HEADS,
        num_key_value_heads=TINY_KV_HEADS,
        max_position_embeddings=TINY_MAX_POSITIONS,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        tie_word_embeddings=False,
    )


def _tiny_config(arch: str, vocab_size: int, pad_id: int, bos_id: int, eos_id: int):
    from transformers import GPT2Config, LlamaConfig, Qwen2Config, Qwen3Config

    ids = dict(pad_token_id=pad_id, bos_token_id=bos_id, eos_token_id=eos_id)
    if arch == "t5":
        from transformers import T5Config

        return T5Config(
            vocab_size=vocab_size,
            d_model=TINY_HIDDEN,
            d_kv=TINY_HIDDEN // TINY_HEADS,
            d_ff=TINY_INTERMEDIATE,
            num_layers=TINY_LAYERS,
            num_decoder_layers=TINY_LAYERS,
            num_heads=TINY_HEADS,
            feed_forward_proj="relu",
            dropout_rate=0.0,
            tie_word_embeddings=False,
            decoder_start_token_id=pad_id,  # T5's convention: the decoder starts from the pad token
            **ids,
        )
    if arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size,
            n_embd=TINY_HIDDEN,
            n_layer=TINY_LAYERS,
            n_head=TINY_HEADS,
            n_inner=TINY_INTERMEDIATE,
            n_positions=TINY_MAX_POSITIONS,
            **ids,
        )
    decoder = tiny_decoder_kwargs(vocab_size, **ids)
    if arch == "llama":
        return LlamaConfig(**decoder)
    if arch == "qwen2":
        return Qwen2Config(**decoder)
    if arch == "qwen3":
        return Qwen3Config(head_dim=TINY_HIDDEN // TINY_HEADS, **decoder)
    raise ValueError(f"unknown tiny arch {arch!r}; expected one of {', '.join(TINY_ARCHS + TINY_SEQ2SEQ_ARCHS)}")


def build_tiny_model(arch: str, tokenizer=None, seed: int = 0):
    """A randomly initialised `AutoModelForCausalLM` (`AutoModelForSeq2SeqLM` for t5) of the given arch (hidden 64,
    2 layers), in fp32.

    Deterministic for a seed; the global RNG is left untouched.

    Args:
        arch: one of TINY_ARCHS or TINY_SEQ2SEQ_ARCHS.
        tokenizer: sets vocab size and special ids; defaults to `build_tiny_tokenizer()`.
        seed: the init seed.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    if arch not in TINY_ARCHS + TINY_SEQ2SEQ_ARCHS:
        raise ValueError(f"unknown tiny arch {arch!r}; expected one of {', '.join(TINY_ARCHS + TINY_SEQ2SEQ_ARCHS)}")
    tokenizer = tokenizer if tokenizer is not None else build_tiny_tokenizer()
    config = _tiny_config(
        arch,
        vocab_size=len(tokenizer),
        pad_id=tokenizer.pad_token_id,
        bos_id=tokenizer.bos_token_id,
        eos_id=tokenizer.eos_token_id,
    )
    auto_class = AutoModelForSeq2SeqLM if arch in TINY_SEQ2SEQ_ARCHS else AutoModelForCausalLM
    return seeded_from_config(auto_class, config, tokenizer, seed)


def seeded_from_config(auto_class, config, tokenizer, seed: int):
    """`auto_class.from_config(config)` in fp32 with weights drawn from `seed`, leaving the global RNG untouched,
    and generation settings that match `tokenizer`'s special tokens."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = auto_class.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model.eval()


def write_tiny_model(arch: str, out_dir: str, seed: int = 0) -> str:
    """Save a tiny model (safetensors) and its tokenizer to `out_dir`; returns `out_dir`.

    The result loads offline with `AutoModelForCausalLM.from_pretrained(out_dir)` and
    `AutoTokenizer.from_pretrained(out_dir)`.
    """
    tokenizer = build_tiny_tokenizer()
    return save_model_and_tokenizer(build_tiny_model(arch, tokenizer=tokenizer, seed=seed), tokenizer, out_dir)


def save_model_and_tokenizer(model, tokenizer, out_dir: str) -> str:
    """Write `model` (safetensors) and `tokenizer` to `out_dir`; returns `out_dir`."""
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir
