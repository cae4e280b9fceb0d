"""A trained policy that answers chat messages: `discoalign chat` and `serve`'s `/v1/chat/completions`.

The conversation is rendered exactly as training rendered prompts (`data.encode.template_ids`: the checkpoint's
chat template with the generation prompt, or the plain `User:` / `Assistant:` fallback), the answer is sampled from
the policy's causal LM (greedy at temperature 0) and streamed as text while it is generated; it stops at the
tokenizer's EOS or any EOS of the model's generation config (`models.generation.stop_token_ids`).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..config.plan import HeadPlan
from ..config.schema import FinetuningArguments, ModelArguments
from ..data.encode import template_ids
from ..errors import CheckpointError, ConfigError
from ..models.generation import stop_token_ids
from ..models.loader import load_model_with_heads
from ..models.positions import position_limit

ROLES = ("system", "user", "assistant")


@dataclass
class Reply:
    """One generated answer."""

    text: str
    finish_reason: str  # "stop" (a stop token) or "length" (max_new_tokens reached, or cancelled)
    prompt_tokens: int
    completion_tokens: int


class _TextStream:
    """A `generate` streamer: decodes the answer so far and hands each new piece of text to `on_text` (never half a
    multi-byte character: text ending in U+FFFD waits for the next token)."""

    def __init__(self, tokenizer, on_text: Callable[[str], None], stops: list[int]) -> None:
        self.tokenizer, self.on_text, self.stops = tokenizer, on_text, set(stops)
        self.ids: list[int] = []
        self.sent = 0
        self.prompt_seen = False
        self.stopped = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate's first call hands over the prompt
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            if token in self.stops:
                self.stopped = True
            if not self.stopped:
                self.ids.append(int(token))
        self._flush(final=False)

    def end(self) -> None:
        self._flush(final=True)

    def _flush(self, final: bool) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd") and not final:
            return
        if len(text) > self.sent:
            self.on_text(text[self.sent :])
            self.sent = len(text)

    @property
    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)


class _Cancelled:
    """A stopping criterion that ends generation once `event` is set (the client went away)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class ChatEngine:
    """A policy checkpoint (full or LoRA, any stage's output) and its tokenizer, frozen, on one device."""

    def __init__(self, model_dir: str, dtype: str | None = None, device: str = "auto") -> None:
        if not model_dir.startswith("builtin:") and not os.path.isdir(os.path.expanduser(model_dir)):
            raise CheckpointError(f"--model {model_dir!r} is not a directory holding a model.")
        self.model_dir = model_dir
        self.model, self.tokenizer = load_model_with_heads(
            ModelArguments(model_name_or_path=model_dir), FinetuningArguments(stage="sft"), heads=HeadPlan.of(),
            is_trainable=False, torch_dtype=dtype,
        )  # fmt: skip
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            self.model.to(torch.device(device))
        except (RuntimeError, AssertionError) as e:
            raise CheckpointError(f"--device {device!r} cannot hold the model: {' '.join(str(e).split())}") from None
        self.model.eval()
        self.causal_lm = self.model.causal_lm
        self.stops = stop_token_ids(self.tokenizer, getattr(self.causal_lm, "generation_config", None))
        limit = position_limit(model_dir)
        self.max_positions = limit[0] if limit else None
        self.lock = threading.Lock()  # one generation at a time

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """The conversation as training renders a prompt, ending with the generation prompt."""
        return template_ids(self.tokenizer, messages, add_generation_prompt=True)

    def check_length(self, prompt_length: int, max_new_tokens: int) -> None:
        """The prompt and the answer must fit in the model's positions."""
        if self.max_positions is not None and prompt_length + max_new_tokens > self.max_positions:
            raise ConfigError(f"the conversation has {prompt_length} tokens and the answer may take {max_new_tokens} "
                              f"more, beyond the model's {self.max_positions} positions; shorten it (or ask for fewer "
                              "tokens)")  # fmt: skip

    @torch.no_grad()
    def generate(
        self,
        messages: list[dict[str, str]],
        *,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        seed: int | None = None,
        on_text: Callable[[str], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> Reply:
        """Answer `messages` (sampled at `temperature`, greedy at 0, nucleus `top_p`); each new piece of text goes
        to `on_text` as it is generated."""
        from transformers import GenerationConfig, StoppingCriteriaList

        ids = self.prompt_ids(messages)
        self.check_length(len(ids), max_new_tokens)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.stops[0]
        config = GenerationConfig(
            max_new_tokens=max_new_tokens, do_sample=temperature > 0, temperature=temperature if temperature > 0
            else None, top_p=top_p if temperature > 0 else None, top_k=0 if temperature > 0 else None,
            eos_token_id=self.stops, pad_token_id=pad,
        )  # fmt: skip
        stream = _TextStream(self.tokenizer, on_text or (lambda text: None), self.stops)
        device = self.model.device
        with self.lock, torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
            if seed is not None:
                torch.manual_seed(seed)
            self.causal_lm.generate(
                input_ids=torch.tensor([ids], device=device), attention_mask=torch.ones(1, len(ids), device=device,
                dtype=torch.long), generation_config=config, streamer=stream,
                stopping_criteria=StoppingCriteriaList([_Cancelled(cancel)]) if cancel is not None else None,
            )  # fmt: skip
        return Reply(stream.text, "stop" if stream.stopped else "length", len(ids), len(stream.ids))


def check_messages(messages, where: str = "messages") -> list[dict[str, str]]:
    """OpenAI-style messages as `{"role", "content"}` dicts; ConfigError naming the bad one. Content may be a string
    or a list of `{"type": "text", "text": ...}` parts (joined)."""
    if not isinstance(messages, list) or not messages:
        raise ConfigError(f'`{where}` must be a non-empty list of {{"role", "content"}} objects')
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise ConfigError(f"`{where}[{i}]` must be an object whose `role` is one of {', '.join(ROLES)}")
        content = message.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):  # fmt: skip
                raise ConfigError(f"`{where}[{i}].content` parts must be text parts ({{\"type\": \"text\", \"text\": "
                                  "...}}); this model reads text only")  # fmt: skip
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ConfigError(f"`{where}[{i}].content` must be a string")
        out.append({"role": message["role"], "content": content})
    if out[-1]["role"] != "user":
        raise ConfigError(f"the last of `{where}` must be the user's (the model answers it)")
    return out
