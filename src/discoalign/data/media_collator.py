"""Batching pairwise rows with images / audio for a multimodal model.

The text part is `PairwiseCollator`'s (rows 0..B-1 prompt+chosen, B..2B-1 prompt+rejected). Each pair's media
belong to its prompt, which both of its sequences contain, so the media are listed twice, in row order: the
chosen rows' media, then the rejected rows' again. That is the order in which a model meets the placeholder
tokens when it walks the (2B, T) batch row by row, which is how it assigns features to placeholders.

Media inputs are per item, not per row: `pixel_values` stacks the patches of all images (each image keeps its
own size; `image_grid_thw` says where one ends), `input_features` stacks fixed-length audio windows with a
`feature_attention_mask`. So rows with different image sizes or audio lengths batch together, and each row
gets the same features it gets alone.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ConfigError, DataError
from .checks import RowProblem
from .collator import PairwiseCollator
from .media import AUDIO_COLUMN, IMAGE_COLUMN
from .media_processor import MediaProcessor


class MultimodalPairwiseCollator:
    """`PairwiseCollator` plus the media inputs the model takes (`MediaProcessor.supported`).

    Returns PairwiseCollator's keys, plus (when the batch has images) `pixel_values` (P, D) fp32 and
    `image_grid_thw` (2 x images, 3) long; `mm_token_type_ids` (2B, T) int32 when the model takes it; (when
    the batch has audio) `input_features` (2 x audios, mels, frames) fp32 and `feature_attention_mask`
    (2 x audios, frames) long.
    """

    def __init__(self, pad_token_id: int, media: MediaProcessor, padding_side: str = "right") -> None:
        self.text = PairwiseCollator(pad_token_id, padding_side=padding_side)
        self.media = media

    def _load(self, rows: list[dict[str, Any]], column: str, load) -> list:
        items = []
        for index, row in enumerate(rows):
            refs = row.get(column) or []
            try:
                items += load(refs)
            except RowProblem as problem:  # the file changed or vanished since the dataset was built
                raise DataError(
                    f"Cannot batch row {index} of this batch: field `{problem.field}`: {problem.reason}: "
                    f"{problem.detail}."
                ) from None
        return items

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.text(rows)
        images = self._load(rows, IMAGE_COLUMN, self.media.load_images) if self.media.takes_images else []
        waves = self._load(rows, AUDIO_COLUMN, self.media.load_audios) if self.media.takes_audio else []
        # Chosen rows, then rejected rows: each pair's media appear once per sequence.
        batch.update(self.media.batch_inputs(images, waves, batch["input_ids"], copies=2))
        return batch


def make_pairwise_collator(tokenizer, model, padding_side: str = "right", pack_pairs: bool = False):
    """The pairwise collator for `model`: `MultimodalPairwiseCollator` when it has a media processor, else
    the text `PairwiseCollator` (which the trainer switches to packed pairs when `pack_pairs` is set)."""
    media = getattr(model, "media_processor", None)
    if media is None:
        return PairwiseCollator(tokenizer.pad_token_id, padding_side=padding_side)
    if pack_pairs:
        raise ConfigError(
            "`pack_pairs: true` cannot be used with a multimodal model: packed rows would share one set of position "
            "ids, while the model derives positions (and placeholder order) from its images / audio. Set "
            "`pack_pairs: false` (`group_by_length: true` still cuts padding)."
        )
    return MultimodalPairwiseCollator(tokenizer.pad_token_id, media, padding_side=padding_side)
