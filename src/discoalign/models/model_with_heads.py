"""A causal LM backbone (full, or wrapped as a PEFT model) plus the value / variance / beta heads.

The heads read the backbone's *last* hidden state, obtained by calling the decoder body directly: no LM
logits (a vocab-sized tensor per token) and no stack of every layer's hidden states are ever built.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..config.attention import PAIR_SDPA
from ..config.heads import HEAD_NAMES, HEAD_SPECS
from ..losses.logps import DEFAULT_CHUNK_SIZE, pair_sequence_logps
from .heads import gather_last_token, pool_prompt
from .modality import ActorModality, supported_parameters
from .pair_attention import pair_attention_mask
from .quantization import last_hidden_device
from .seq2seq import is_seq2seq_config, seq2seq_hidden_states


@dataclass
class HeadsOutput:
    """What `ModelWithHeads.forward` returns.

    last_hidden_state: (N, T, H) in the backbone's dtype.
    mean: (N,) fp32 at each row's last real token, or None without a value head.
    variance: (N,) fp32, or None without a variance head (or when not asked for).
    logps: (2B,) fp32 summed response log-probs, when `labels` were given.
    prompt_heads: {head name: (B,) fp32} of the prompt-reading heads, when `prompt_features` were given.
    features: (N, H) fp32, what the value / variance heads read (each row's last real token), when asked for.
    """

    last_hidden_state: torch.Tensor
    mean: torch.Tensor | None = None
    variance: torch.Tensor | None = None
    logps: torch.Tensor | None = None
    prompt_heads: dict[str, torch.Tensor] = field(default_factory=dict)
    features: torch.Tensor | None = None

    @property
    def beta_scale(self) -> torch.Tensor | None:
        """(B,) s(x) of the beta head, when it ran."""
        return self.prompt_heads.get("beta_head")


def _is_peft_model(module: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # peft is a dependency, but the wrapper must not need it for full models
        return False
    return isinstance(module, PeftModel)


def last_token_hidden(
    hidden: torch.Tensor, attention_mask: torch.Tensor, score_index: torch.Tensor | None = None
) -> torch.Tensor:
    """hidden (N, T, H) -> (M, H): each row's last real token (M = N), or the flat `score_index` (M,) positions."""
    if score_index is None:
        return gather_last_token(hidden, attention_mask)
    return hidden.reshape(-1, hidden.shape[-1])[score_index]


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(N, T) 0/1 mask -> (N, T) long position ids counting real tokens only.

    With left padding the first real token must sit at position 0, as it would when the row is run alone;
    the models' default (0..T-1 for every row) would shift it by the pad length.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class RewardScoring:
    """`score` for anything with a `score_detailed` (a `ModelWithHeads`, or a reward adapter on a policy's base)."""

    def score(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, with_variance: bool = True, **model_inputs: Any
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """input_ids, attention_mask: (N, T) -> (mean (N,), variance (N,) | None), fp32, read at each row's last real
        token; variance is None without a variance head or when `with_variance=False`."""
        out = self.score_detailed(input_ids, attention_mask, with_variance=with_variance, **model_inputs)
        return out.mean, out.variance


class ModelWithHeads(RewardScoring, nn.Module):
    """`backbone` (a transformers CausalLM, possibly a PeftModel) with optional heads.

    Usable as the `model` of a `transformers.Trainer`: it has `config`, `gradient_checkpointing_enable`,
    and a `forward` that goes through the module call (so DDP/FSDP wrappers see it).
    """

    def __init__(
        self,
        backbone: nn.Module,
        heads: Mapping[str, nn.Module] | None = None,
        heads_config: dict[str, Any] | None = None,
        modality: ActorModality = ActorModality.LANGUAGE_ONLY,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        heads = dict(heads or {})
        unknown = set(heads) - set(HEAD_NAMES)
        if unknown:
            raise KeyError(f"unknown head(s) {sorted(unknown)}; the registry (config/heads.py) has {HEAD_NAMES}")
        # Every registered head is an attribute (None when absent): `model.beta_head`, `model.variance_head`, ...
        for name in HEAD_NAMES:
            setattr(self, name, heads.get(name))
        self.heads_config: dict[str, Any] = dict(heads_config or {})
        self.modality = modality
        # Multimodal models: the `data.media_processor.MediaProcessor` that turns images / audio into this
        # model's inputs (set by the loader, saved with the checkpoint); None for text models.
        self.media_processor: Any = None
        # A reward model's epistemic estimator (`models.epistemic`), fitted after training; None without one.
        self.epistemic: Any = None

    @property
    def heads(self) -> dict[str, nn.Module]:
        """The heads this model has, by registry name, in registry order."""
        return {name: getattr(self, name) for name in HEAD_NAMES if getattr(self, name) is not None}

    # ---- what the backbone is ------------------------------------------------------------------

    @property
    def config(self):
        """The backbone's transformers config."""
        return self.causal_lm.config

    @property
    def is_peft(self) -> bool:
        return _is_peft_model(self.backbone)

    @property
    def causal_lm(self) -> nn.Module:
        """The transformers CausalLM (inside the PEFT wrapper when there is one; LoRA layers injected)."""
        return self.backbone.get_base_model() if self.is_peft else self.backbone

    @property
    def decoder(self) -> nn.Module:
        """The decoder body whose output is the last (final-norm) hidden state: `model` / `transformer` / ..."""
        lm = self.causal_lm
        body = lm.base_model
        return body if body is not lm else lm.get_decoder()

    @property
    def lm_head(self) -> nn.Module:
        """The output embedding, so log-probs can be computed from hidden states in chunks."""
        return self.causal_lm.get_output_embeddings()

    @property
    def final_logit_softcap(self) -> float | None:
        """The config's final-logit soft-cap (Gemma 2's `final_logit_softcapping`), or None.

        Read here only: the log-probs of `forward` (the DPO policy and its reference) and of PPO's policy cap alike.
        """
        return getattr(self.config, "final_logit_softcapping", None)

    @property
    def supported_parameters(self) -> tuple[str, ...]:
        """The media inputs (`pixel_values`, `image_grid_thw`, `input_features`, ...) the backbone's forward takes.

        Collators build exactly these and trainers pass exactly these; () for a text model.
        """
        return supported_parameters(self.decoder, self.modality)

    @property
    def uses_media_positions(self) -> bool:
        """True when the backbone derives position ids from the media grids (Qwen2-VL's M-RoPE)."""
        return hasattr(self.decoder, "get_rope_index")

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    @property
    def is_seq2seq(self) -> bool:
        """True for an encoder-decoder backbone (T5 / BART): the heads read the decoder (`models.seq2seq`)."""
        return is_seq2seq_config(self.config)

    def place_heads_on_hidden_device(self) -> None:
        """Move the heads to the device of the last hidden state (a model split by `device_map`, or quantised), so
        their outputs are returned there, as TRL's value-head wrapper does."""

        body = self.causal_lm.get_decoder() if self.is_seq2seq else self.decoder
        device = last_hidden_device(body)
        for head in self.heads.values():
            head.to(device)

    # ---- computation ---------------------------------------------------------------------------

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **model_inputs: Any) -> torch.Tensor:
        """input_ids, attention_mask: (N, T) -> the backbone's last hidden state (N, T, H).

        With packed pairs, `model_inputs` holds `segment_ids` and `position_ids` (see `data.packing`) and the
        mask is built from them. Position ids follow the mask (see `positions_from_mask`) unless given in
        `model_inputs`, or unless the
        batch carries image/video grids for an M-RoPE model, which then computes its 3-D positions from the
        grids and the mask itself. `model_inputs` may hold media inputs (see `supported_parameters`).
        """
        if self.is_seq2seq:
            return seq2seq_hidden_states(self.causal_lm, input_ids, attention_mask, **model_inputs)[0]
        segment_ids = model_inputs.pop("segment_ids", None)
        pair_segments = model_inputs.pop("pair_segments", None)
        if segment_ids is not None:
            # Packed pairs (`data.packing`): the collator's position ids, and a mask that keeps chosen and
            # rejected apart while both see the shared prompt.
            if model_inputs.get("position_ids") is None:
                raise ValueError("packed pairs (segment_ids) need their position_ids")
            implementation = self.config._attn_implementation
            attention_mask = pair_attention_mask(segment_ids, implementation, self.causal_lm.dtype)
            if implementation == PAIR_SDPA and pair_segments is not None:
                # The segment-aware sdpa (`models.pair_attention`) reads the segment lengths instead of the mask.
                model_inputs["pair_segments"] = [tuple(row) for row in pair_segments.tolist()]
        has_grids = any(model_inputs.get(k) is not None for k in ("image_grid_thw", "video_grid_thw"))
        if not (has_grids and self.uses_media_positions):
            model_inputs.setdefault("position_ids", positions_from_mask(attention_mask))
        out = self.decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **model_inputs)
        return out[0] if isinstance(out, tuple) else out.last_hidden_state

    def score_detailed(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        with_variance: bool = True,
        with_features: bool = False,
        **model_inputs: Any,
    ) -> HeadsOutput:
        """`score` as a `HeadsOutput`, with the pooled features the heads read when `with_features` (for an epistemic
        estimator that needs them). Calls the module, so hooks and DDP wrappers apply."""
        if self.value_head is None:
            raise RuntimeError("this model has no value head; load it with add_value_head=True to score")
        return self(input_ids, attention_mask, with_variance=with_variance, with_features=with_features, **model_inputs)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        with_heads: bool = True,
        with_variance: bool = True,
        with_features: bool = False,
        score_index: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        logps_chunk_size: int = DEFAULT_CHUNK_SIZE,
        prompt_features: torch.Tensor | None = None,
        prompt_heads: tuple[str, ...] | None = None,
        own_prompt: tuple[torch.Tensor, str] | None = None,
        **model_inputs: Any,
    ) -> HeadsOutput:
        """input_ids, attention_mask: (N, T) -> HeadsOutput (hidden (N, T, H); mean, variance (N,) fp32).

        `with_heads=False` skips the value / variance heads. Packed pairs pass `segment_ids`, `position_ids` and
        `score_index` (see `data.packing`); the heads then read one value per sequence, (2N,), chosen first.
        `labels` (2B, T): also return the summed response log-probs (`losses.logps.pair_sequence_logps`, chunks of
        `logps_chunk_size`). `prompt_features` (B, H), the reference's features of each pair's prompt: also return
        the outputs of the prompt-reading heads `prompt_heads` (default: every one this model has; the beta head's
        s(x)). Both are computed here, inside the forward, because DDP and FSDP only see (and, for FSDP, only
        gather) parameters used in it. `own_prompt` (prompt_last_index (B,), pooling), for a model without a
        reference (a reward model's flip-rate head): the prompt heads read this forward's own prompt features,
        detached (`heads.pool_prompt` over rows [0, B)).
        """
        hidden = self.hidden_states(input_ids, attention_mask, **model_inputs)
        out = HeadsOutput(last_hidden_state=hidden)
        if self.is_seq2seq and model_inputs.get("decoder_input_ids") is not None:  # heads read the decoder's tokens
            attention_mask = model_inputs.get("decoder_attention_mask")
            if attention_mask is None:
                attention_mask = torch.ones_like(model_inputs["decoder_input_ids"])
        wants_variance = with_variance and self.variance_head is not None
        if with_heads and (self.value_head is not None or wants_variance):
            # Each row's last non-padding token, found from the mask (never from pad ids); for packed pairs, the flat
            # `score_index` positions, one per sequence.
            last = last_token_hidden(hidden, attention_mask, score_index).float()
            out.mean = self.value_head(last) if self.value_head is not None else None
            out.variance = self.variance_head(last) if wants_variance else None
            out.features = last if with_features else None
        if labels is not None:
            # A model split by `device_map` ends on another device than its inputs: read there, return with them.
            logps = pair_sequence_logps(
                hidden, self.lm_head, labels.to(hidden.device), logps_chunk_size, self.final_logit_softcap
            )
            out.logps = logps.to(input_ids.device)
        if own_prompt is not None:
            prompt_features = pool_prompt(hidden.detach(), attention_mask, *own_prompt)
        if prompt_features is not None:
            out.prompt_heads = self.prompt_head_outputs(prompt_features, prompt_heads)
        return out

    def prompt_head_outputs(
        self, prompt_features: torch.Tensor, names: tuple[str, ...] | None = None
    ) -> dict[str, torch.Tensor]:
        """(B, H) reference prompt features -> {head name: (B,) fp32} for the prompt-reading heads `names` (default:
        every one this model has; a head may return several outputs as a dict, e.g. the flip-rate head's
        `flip_head/scale`). A head run in training mode updates its running statistics."""
        if names is None:
            names = tuple(spec.name for spec in HEAD_SPECS if spec.reads == "prompt" and spec.name in self.heads)
        missing = [n for n in names if getattr(self, n) is None]
        if missing:
            raise RuntimeError(f"prompt features were given for the {', '.join(missing)}, which this model lacks")
        outputs: dict[str, torch.Tensor] = {}
        for name in names:
            value = getattr(self, name)(prompt_features)
            outputs.update(value if isinstance(value, dict) else {name: value})
        return outputs

    # ---- Trainer / reference-model plumbing ----------------------------------------------------

    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs: dict | None = None, every_n_layers: int = 1, offload: bool = False
    ) -> None:
        """Delegate to the backbone with `use_reentrant=False` (the reentrant variant breaks with frozen inputs).

        This is what `transformers.Trainer` calls for `gradient_checkpointing: true` (transformers >= 5.x).
        """
        kwargs = {"use_reentrant": False, **(activation_checkpointing_kwargs or {})}
        self.causal_lm.activation_checkpointing_enable(
            activation_checkpointing_kwargs=kwargs, every_n_layers=every_n_layers, offload=offload
        )
        if self.is_peft:
            # Embeddings are frozen under LoRA; should a reentrant checkpoint be asked for, it would then see
            # no grad-requiring input and silently drop the adapters' gradients.
            self.causal_lm.enable_input_require_grads()
        self.causal_lm.config.use_cache = False

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs: Any) -> None:
        """Older name of `activation_checkpointing_enable` (same arguments)."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def activation_checkpointing_disable(self) -> None:
        self.causal_lm.activation_checkpointing_disable()

    def gradient_checkpointing_disable(self) -> None:
        self.activation_checkpointing_disable()

    @property
    def is_activation_checkpointing(self) -> bool:
        return any(getattr(m, "gradient_checkpointing", False) is True for m in self.causal_lm.modules())

    is_gradient_checkpointing = is_activation_checkpointing

    def disable_adapter(self) -> contextlib.AbstractContextManager:
        """Context in which the model is the LoRA reference (adapters off); a no-op for full models."""
        return self.backbone.disable_adapter() if self.is_peft else contextlib.nullcontext()
