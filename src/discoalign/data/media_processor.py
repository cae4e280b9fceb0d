"""`MediaProcessor`: turns a row's images / audio into a multimodal model's placeholder tokens and inputs.

It does what a transformers `Processor` does (Qwen2-VL's cannot be built without torchvision, which has no
CPU build here), with the pieces that need no torchvision or torchaudio: the image processor (PIL backend)
and `WhisperFeatureExtractor` (numpy).

* Placeholders: each `<image>` / `<audio>` marker in the prompt (LlamaFactory's markers; a row without any
  gets them prepended to its first user turn) becomes the model's token run, one token per language-model
  position: Qwen2-VL `<|vision_start|>` + `<|image_pad|>` x (grid_t * grid_h * grid_w / merge^2) +
  `<|vision_end|>`, Qwen2-Audio `<|audio_bos|>` + `<|AUDIO|>` x n + `<|audio_eos|>`. The text is then
  templated and tokenised like any other row.
* Inputs: `pixel_values` (patches, D) + `image_grid_thw` (images, 3); `input_features` (audios, mels, frames)
  + `feature_attention_mask`; `mm_token_type_ids` (text 0, image 1, video 2) where the model takes it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .checks import RowProblem
from .media import (
    AUDIO_COLUMN,
    IMAGE_COLUMN,
    MEDIA_MISMATCH,
    MEDIA_UNSUPPORTED,
    VIDEO_COLUMN,
    audio_refs,
    image_refs,
    open_image,
    read_audio,
)

logger = logging.getLogger(__name__)

IMAGE_MARKER = "<image>"
AUDIO_MARKER = "<audio>"
VIDEO_MARKER = "<video>"


@dataclass(frozen=True)
class MediaTokens:
    """The token strings of a model's placeholders (None where the model has no such token)."""

    image: str | None = None
    image_start: str | None = None
    image_end: str | None = None
    video: str | None = None
    audio: str | None = None
    audio_start: str | None = None
    audio_end: str | None = None

    def reserved(self) -> list[str]:
        return [t for t in (self.image, self.image_start, self.image_end, self.video, self.audio,
                            self.audio_start, self.audio_end) if t]  # fmt: skip


def qwen2_audio_output_length(feature_frames: int) -> int:
    """Language-model positions of an audio of `feature_frames` mel frames (Qwen2-Audio: conv stride 2, pool 2)."""
    return (((feature_frames - 1) // 2 + 1) - 2) // 2 + 1


class MediaProcessor:
    """Placeholder expansion and input building for one multimodal model.

    Args:
        tokenizer: the model's tokenizer (placeholder strings must be single tokens in it).
        tokens: the placeholder token strings.
        supported: the media inputs the model's forward takes (`ModelWithHeads.supported_parameters`).
        image_processor: a Qwen2-VL-style image processor (returns `image_grid_thw`), or None.
        feature_extractor: a Whisper-style feature extractor, or None.
        image_max_pixels / image_min_pixels: images are scaled into this range first (config keys).
    """

    def __init__(
        self,
        tokenizer,
        tokens: MediaTokens,
        supported: tuple[str, ...],
        image_processor=None,
        feature_extractor=None,
        image_max_pixels: int = 768 * 768,
        image_min_pixels: int = 32 * 32,
    ) -> None:
        self.tokens = tokens
        self.supported = tuple(supported)
        self.image_processor = image_processor if tokens.image else None
        self.feature_extractor = feature_extractor if tokens.audio else None
        self.image_max_pixels = image_max_pixels
        self.image_min_pixels = image_min_pixels
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in tokens.reserved()}
        unknown = [t for t, i in ids.items() if i is None or i == tokenizer.unk_token_id]
        if unknown:
            raise ValueError(f"the tokenizer has no single token for {', '.join(unknown)}")
        self.image_token_id = ids.get(tokens.image)
        self.video_token_id = ids.get(tokens.video)
        self.audio_token_id = ids.get(tokens.audio)
        self._warned_long_audio = False

    @property
    def takes_images(self) -> bool:
        return self.image_processor is not None

    @property
    def takes_audio(self) -> bool:
        return self.feature_extractor is not None

    @property
    def sampling_rate(self) -> int:
        return int(self.feature_extractor.sampling_rate)

    # ---- loading -----------------------------------------------------------------------------------

    def load_images(self, refs: list[dict[str, Any]], field: str = IMAGE_COLUMN) -> list:
        """PIL images of normalised references (RowProblem on a missing or corrupt file)."""
        return [
            open_image(r, f"{field}[{i}]", self.image_max_pixels, self.image_min_pixels) for i, r in enumerate(refs)
        ]

    def load_audios(self, refs: list[dict[str, Any]], field: str = AUDIO_COLUMN) -> list[np.ndarray]:
        """Mono waveforms at the feature extractor's rate (RowProblem on a missing file or a wrong rate)."""
        waves = [read_audio(r, f"{field}[{i}]", self.sampling_rate) for i, r in enumerate(refs)]
        window = getattr(self.feature_extractor, "n_samples", None)
        if window and not self._warned_long_audio and any(len(w) > window for w in waves):
            self._warned_long_audio = True
            logger.warning(
                "Some audio is longer than the feature extractor's %.1f s window; only its first %.1f s are used.",
                window / self.sampling_rate, window / self.sampling_rate,
            )  # fmt: skip
        return waves

    # ---- model inputs ------------------------------------------------------------------------------

    def image_inputs(self, images: list) -> dict[str, torch.Tensor]:
        """`pixel_values` (sum of patches, C*T*P*P) and `image_grid_thw` (images, 3) long."""
        out = self.image_processor(images=images, return_tensors="pt")
        return {"pixel_values": out["pixel_values"].float(), "image_grid_thw": out["image_grid_thw"].long()}

    def audio_inputs(self, waves: list[np.ndarray]) -> dict[str, torch.Tensor]:
        """`input_features` (audios, mels, frames) fp32 and `feature_attention_mask` (audios, frames) long.

        Every audio is padded to the extractor's fixed window, so a batch gives each audio exactly the
        features it gets alone.
        """
        out = self.feature_extractor(
            waves,
            sampling_rate=self.sampling_rate,
            return_attention_mask=True,
            padding="max_length",
            return_tensors="pt",
        )
        return {"input_features": out["input_features"].float(), "feature_attention_mask": out["attention_mask"].long()}

    def image_token_counts(self, images: list) -> list[int]:
        """Language-model tokens of each image: grid_t * grid_h * grid_w / merge_size^2."""
        if not images:
            return []
        merge = int(getattr(self.image_processor, "merge_size", 1) or 1)
        count_patches = getattr(self.image_processor, "get_number_of_image_patches", None)
        if count_patches is not None:  # the processor's own resize arithmetic, without processing the pixels
            return [int(count_patches(image.height, image.width, {})) // merge**2 for image in images]
        grid = self.image_inputs(images)["image_grid_thw"]
        return [int(n) for n in (grid.prod(-1) // merge**2).tolist()]

    def audio_token_counts(self, waves: list[np.ndarray]) -> list[int]:
        """Language-model tokens of each audio (from its unpadded mel frames)."""
        if not waves:
            return []
        frames = self.audio_inputs(waves)["feature_attention_mask"].sum(-1).tolist()
        return [qwen2_audio_output_length(int(f)) for f in frames]

    def token_type_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (N, T) -> `mm_token_type_ids` (N, T) int32: 1 on image tokens, 2 on video tokens, else 0."""
        types = torch.zeros_like(input_ids, dtype=torch.int32)
        if self.image_token_id is not None:
            types[input_ids == self.image_token_id] = 1
        if self.video_token_id is not None:
            types[input_ids == self.video_token_id] = 2
        return types

    def batch_inputs(
        self, images: list, waves: list[np.ndarray], input_ids: torch.Tensor, copies: int = 1
    ) -> dict[str, torch.Tensor]:
        """Every supported media input of one batch: images / waves in the order their tokens appear, the whole
        list repeated `copies` times (a pairwise batch holds each prompt twice); processed once, then repeated."""
        batch: dict[str, torch.Tensor] = {}
        if images:
            batch.update(self.image_inputs(images))
        if waves:
            batch.update(self.audio_inputs(waves))
        batch = {k: torch.cat([v] * copies) for k, v in batch.items()}
        if "mm_token_type_ids" in self.supported:
            batch["mm_token_type_ids"] = self.token_type_ids(input_ids)
        return {k: v for k, v in batch.items() if k in self.supported}

    # ---- rows --------------------------------------------------------------------------------------

    def _expand(self, prompt: list[dict[str, str]], marker: str, runs: list[str], field: str) -> list[dict[str, str]]:
        """Replace the k-th `marker` of the prompt by `runs[k]`; with no marker at all, prepend the runs."""
        found = sum(m["content"].count(marker) for m in prompt)
        if not runs and not found:
            return prompt
        if found == 0:
            first_user = next(i for i, m in enumerate(prompt) if m["role"] == "user")
            prompt = [dict(m) for m in prompt]
            prompt[first_user]["content"] = marker * len(runs) + prompt[first_user]["content"]
            found = len(runs)
        if found != len(runs):
            raise RowProblem(
                MEDIA_MISMATCH, field,
                f"the prompt has {found} {marker} marker(s) but the row has {len(runs)} {field} item(s)",
            )  # fmt: skip
        pending = iter(runs)
        out = []
        for message in prompt:
            parts = message["content"].split(marker)
            content = parts[0] + "".join(next(pending) + rest for rest in parts[1:])
            out.append({**message, "content": content})
        return out

    def prepare_row(self, pair: dict[str, Any], raw: dict[str, Any], base_dir: str | None) -> dict[str, Any]:
        """A canonical pairwise row with its media: markers expanded, media references added.

        Loads every image / audio once (to count its tokens, and so that a missing, corrupt or wrongly sampled
        file is reported with its row now rather than in the middle of training). Raises RowProblem.
        """
        if raw.get(VIDEO_COLUMN):
            raise RowProblem(MEDIA_UNSUPPORTED, VIDEO_COLUMN, "video inputs are not supported yet")
        images = image_refs(raw.get(IMAGE_COLUMN), base_dir)
        audios = audio_refs(raw.get(AUDIO_COLUMN), base_dir)
        if images and not self.takes_images:
            raise RowProblem(MEDIA_UNSUPPORTED, IMAGE_COLUMN, "the row has images but the model takes no images")
        if audios and not self.takes_audio:
            raise RowProblem(MEDIA_UNSUPPORTED, AUDIO_COLUMN, "the row has audio but the model takes no audio")
        for field in ("prompt", "chosen", "rejected"):
            for message in pair[field]:
                reserved = [t for t in self.tokens.reserved() if t in message["content"]]
                if reserved:
                    raise RowProblem(
                        MEDIA_MISMATCH, field,
                        f"the text contains the model's reserved media token {reserved[0]!r}; write {IMAGE_MARKER} / "
                        f"{AUDIO_MARKER} markers instead",
                    )  # fmt: skip
                if field != "prompt" and any(m in message["content"] for m in (IMAGE_MARKER, AUDIO_MARKER)):
                    raise RowProblem(MEDIA_MISMATCH, field, "media markers may appear only in the prompt")
        if any(VIDEO_MARKER in m["content"] for m in pair["prompt"]):
            raise RowProblem(
                MEDIA_UNSUPPORTED, "prompt", f"the prompt has a {VIDEO_MARKER} marker; videos are not supported yet"
            )

        prompt = pair["prompt"]
        out = dict(pair)
        if self.takes_images:
            t = self.tokens
            counts = self.image_token_counts(self.load_images(images))
            runs = [(t.image_start or "") + t.image * n + (t.image_end or "") for n in counts]
            prompt = self._expand(prompt, IMAGE_MARKER, runs, IMAGE_COLUMN)
            out[IMAGE_COLUMN] = images
        if self.takes_audio:
            t = self.tokens
            counts = self.audio_token_counts(self.load_audios(audios))
            runs = [(t.audio_start or "") + t.audio * n + (t.audio_end or "") for n in counts]
            prompt = self._expand(prompt, AUDIO_MARKER, runs, AUDIO_COLUMN)
            out[AUDIO_COLUMN] = audios
        out["prompt"] = prompt
        return out

    def tokens_intact(self, row: dict[str, Any]) -> bool:
        """Whether truncation to `cutoff_len` kept every placeholder token of the prompt (else the row is dropped)."""
        ids = row["prompt_input_ids"]
        for token, token_id in ((self.tokens.image, self.image_token_id), (self.tokens.audio, self.audio_token_id)):
            if token is None:
                continue
            expected = sum(m["content"].count(token) for m in row["prompt"])
            if sum(1 for i in ids if i == token_id) != expected:
                return False
        return True

    def save_pretrained(self, output_dir: str) -> None:
        """Write the image processor / feature extractor (`preprocessor_config.json`) next to the model."""
        for part in (self.image_processor, self.feature_extractor):
            if part is not None:
                part.save_pretrained(output_dir)
