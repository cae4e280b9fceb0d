"""Every limit of `discoalign serve`, in one place: sizes, counts, timeouts and the API key (the command's flags)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import ConfigError

API_KEY_ENV = "DISCOALIGN_API_KEY"


@dataclass
class ServeSettings:
    """Limits of one server. A request over a size limit gets 413, one over a count limit 413 (or 503 when the
    queue is full), a client too slow with its headers is disconnected and one too slow with its body gets 408."""

    cutoff_len: int = 2048  # longest query (reward) or prompt + answer (chat), in tokens
    max_batch_tokens: int = 16384  # token budget of one forward: items x longest item
    max_queue: int = 4096  # items waiting to be scored (reward) or requests waiting to generate (chat)
    max_request_bytes: int = 8 * 1024 * 1024  # largest request body
    max_request_items: int = 1024  # most queries in one reward request
    max_new_tokens: int = 512  # chat: most tokens one answer may ask for
    header_timeout: float = 10.0  # seconds a client may take to send a request's headers
    body_timeout: float = 30.0  # seconds a client may take to send a request's body
    api_key: str | None = None  # required as `Authorization: Bearer <key>` when set

    def check(self) -> None:
        for name in ("cutoff_len", "max_batch_tokens", "max_queue", "max_request_bytes", "max_request_items",
                     "max_new_tokens", "header_timeout", "body_timeout"):  # fmt: skip
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} is {getattr(self, name)}; it must be positive.")
        if self.max_batch_tokens < self.cutoff_len:
            raise ConfigError(f"--max-batch-tokens ({self.max_batch_tokens}) must be at least --cutoff-len "
                              f"({self.cutoff_len}), so that the longest allowed query fits in a batch.")  # fmt: skip
        if self.api_key is not None and len(self.api_key) < 16:
            raise ConfigError(f"The API key (--api-key or {API_KEY_ENV}) has {len(self.api_key)} characters; use at "
                              "least 16 (e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`).")  # fmt: skip


def settings_from_flags(ns) -> ServeSettings:
    """The settings of `discoalign serve`'s flags; the API key from --api-key, else the environment."""
    settings = ServeSettings(
        cutoff_len=ns.cutoff_len, max_batch_tokens=ns.max_batch_tokens, max_queue=ns.max_queue,
        max_request_bytes=ns.max_request_bytes, max_request_items=ns.max_request_items,
        max_new_tokens=ns.max_new_tokens, header_timeout=ns.header_timeout, body_timeout=ns.body_timeout,
        api_key=ns.api_key or os.environ.get(API_KEY_ENV) or None,
    )  # fmt: skip
    settings.check()
    return settings
