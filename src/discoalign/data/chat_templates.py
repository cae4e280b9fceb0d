"""Chat templates chosen by name (`template: llama3`), as LlamaFactory's `template` key chooses them.

Without `template` the tokenizer's own chat template is used (and the plain `User:` / `Assistant:` fallback of
`data.encode` when it has none). A named template replaces it: its Jinja text is set as the tokenizer's
`chat_template` (so the checkpoint a run saves carries it, and `score`, `serve`, `chat` and a later stage render the
same way), its turn-end token becomes the tokenizer's EOS (LlamaFactory's `replace_eos`), and its marker tokens
that the tokenizer lacks are added as special tokens (the model's embeddings grow to match: `models.vocabulary`).

Each template renders the token sequence of LlamaFactory's template of the same name (data/template.py there) for
alternating user / assistant turns with an optional leading system message; tools and observations are not
supported. The formats, with `{bos}` / `{eos}` the tokenizer's own tokens:

| name | a user turn, then the assistant's | turn end (EOS) |
|---|---|---|
| default | `Human: {user}{eos}\\nAssistant:{answer}{eos}\\n` | the tokenizer's |
| llama3 | `<|start_header_id|>user<|end_header_id|>\\n\\n{user}<|eot_id|><|start_header_id|>assistant...` | `<|eot_id|>` |
| llama2 | `{bos}[INST] {user} [/INST]{answer}{eos}` (system fused into the first user turn) | the tokenizer's |
| mistral | `{bos}[INST] {user}[/INST] {answer}{eos}` (system fused) | the tokenizer's |
| gemma | `{bos}<start_of_turn>user\\n{user}<end_of_turn>\\n<start_of_turn>model\\n{answer}<end_of_turn>\\n` | `<end_of_turn>` |
| chatml, qwen3_nothink | `<|im_start|>user\\n{user}<|im_end|>\\n<|im_start|>assistant\\n{answer}<|im_end|>\\n` | `<|im_end|>` |
| qwen | chatml, with Qwen 2.5's default system message | `<|im_end|>` |
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class TemplateSpec:
    """One template's pieces; `{bos}` / `{eos}` stand for the tokenizer's tokens."""

    user: str  # "...{content}..."
    assistant: str  # "...{content}...": after `header`
    header: str = ""  # what opens the assistant's turn (also the generation prompt)
    system: str = ""  # "...{content}..." before the first turn; with `fuse_system`, put before the first user text
    prefix: str = ""  # once, at the start
    fuse_system: bool = False
    default_system: str = ""
    stop: str | None = None  # the turn-end token that becomes EOS; None keeps the tokenizer's
    markers: tuple[str, ...] = ()  # special tokens the template writes (added to a tokenizer that lacks them)


_CHATML = TemplateSpec(
    user="<|im_start|>user\n{content}<|im_end|>\n",
    header="<|im_start|>assistant\n",
    assistant="{content}<|im_end|>\n",
    system="<|im_start|>system\n{content}<|im_end|>\n",
    stop="<|im_end|>",
    markers=("<|im_start|>", "<|im_end|>"),
)

TEMPLATES: dict[str, TemplateSpec] = {
    "default": TemplateSpec(
        user="Human: {content}{eos}\n", header="Assistant:", assistant="{content}{eos}\n",
        system="System: {content}{eos}\n",
    ),  # fmt: skip
    "llama3": TemplateSpec(
        prefix="{bos}",
        user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
        header="<|start_header_id|>assistant<|end_header_id|>\n\n",
        assistant="{content}<|eot_id|>",
        system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
        stop="<|eot_id|>",
        markers=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    ),
    "llama2": TemplateSpec(
        user="{bos}[INST] {content} [/INST]", assistant="{content}{eos}",
        system="<<SYS>>\n{content}\n<</SYS>>\n\n", fuse_system=True,
    ),  # fmt: skip
    "mistral": TemplateSpec(
        prefix="{bos}", user="[INST] {content}[/INST]", assistant=" {content}{eos}", system="{content}\n\n",
        fuse_system=True,
    ),  # fmt: skip
    "gemma": TemplateSpec(
        prefix="{bos}",
        user="<start_of_turn>user\n{content}<end_of_turn>\n",
        header="<start_of_turn>model\n",
        assistant="{content}<end_of_turn>\n",
        system="{content}\n\n",
        fuse_system=True,
        stop="<end_of_turn>",
        markers=("<start_of_turn>", "<end_of_turn>"),
    ),
    "chatml": _CHATML,
    "qwen3_nothink": _CHATML,
    "qwen": TemplateSpec(**{**_CHATML.__dict__,
                            "default_system": "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."}),
}  # fmt: skip


def _jinja_text(piece: str, content: str | None = None) -> str:
    """A piece as Jinja output expressions: literals quoted, `{bos}` / `{eos}` / `{content}` as variables."""
    out = []
    for part in re.split(r"(\{bos\}|\{eos\}|\{content\})", piece):
        if part == "{bos}":
            out.append("{{ bos_token or '' }}")
        elif part == "{eos}":
            out.append("{{ eos_token or '' }}")
        elif part == "{content}":
            out.append("{{ " + (content or "''") + " }}")
        elif part:
            out.append("{{ " + repr(part) + " }}")
    return "".join(out)


def jinja_template(spec: TemplateSpec) -> str:
    """The Jinja chat template (for `tokenizer.chat_template`) that renders `spec`."""
    user = _jinja_text(spec.user, "message['content']")
    fused_user = _jinja_text(spec.user, "(" + _fused_system(spec) + ") + message['content']")
    return (
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
        "{%- else -%}{%- set system = " + repr(spec.default_system) + " -%}{%- set turns = messages -%}{%- endif -%}"
        + _jinja_text(spec.prefix)
        + ("" if spec.fuse_system else "{%- if system -%}" + _jinja_text(spec.system, "system") + "{%- endif -%}")
        + "{%- for message in turns -%}"
        "{%- if message['role'] == 'user' -%}"
        + ("{%- if loop.first and system -%}" + fused_user + "{%- else -%}" + user + "{%- endif -%}"
           if spec.fuse_system else user)
        + "{%- elif message['role'] == 'assistant' -%}"
        + _jinja_text(spec.header) + _jinja_text(spec.assistant, "message['content']")
        + "{%- endif -%}{%- endfor -%}"
        "{%- if add_generation_prompt -%}" + _jinja_text(spec.header) + "{%- endif -%}"
    )  # fmt: skip


def _fused_system(spec: TemplateSpec) -> str:
    """A Jinja expression: the system text formatted by `spec.system`, to put before the first user message."""
    before, _, after = spec.system.partition("{content}")
    return repr(before) + " + system + " + repr(after)
