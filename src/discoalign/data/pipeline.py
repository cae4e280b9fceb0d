"""`get_dataset`: load, convert, check, encode, drop-and-count, split."""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..config.schema import DataArguments
from ..errors import DataError
from .checks import OTHER_FORMAT, TRUNCATED, UNREADABLE, RowProblem, check_text
from .encode import encode_pair, encode_prompt
from .formats import PAIRWISE_FORMATS, check_columns, detect_rows_format, to_pairwise_row, to_prompt_row
from .kto import to_kto_rows
from .media import AUDIO_COLUMN, IMAGE_COLUMN, MEDIA_TRUNCATED, MEDIA_UNSUPPORTED, VIDEO_COLUMN, has_media
from .registry import read_dataset
from .sft import encode_sft, to_sft_rows
from .sources import BUILTIN_SYNTHETIC, RawRows, UnreadableLine, _columns_of, split_specs

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

    from .media_processor import MediaProcessor

logger = logging.getLogger(__name__)

STAGES = ("sft", "rm", "dpo", "ppo", "kto")


@dataclass(frozen=True)
class Purpose:
    """What the rows are read for, as messages name it: `train` / `eval` read training rows and take the YAML key
    `skip_invalid_rows`; `discoalign score` reads rows to score and takes the flag `--skip-invalid-rows`."""

    rows: str = "training rows"
    skip: str = "set `skip_invalid_rows: true`"


TRAINING = Purpose()
SCORING = Purpose(rows="rows to score", skip="pass --skip-invalid-rows")
PROMPTS_TO_SAMPLE = Purpose(rows="prompts to sample from", skip="pass --skip-invalid-rows")


@dataclass
class DatasetBundle:
    """Tokenised datasets of one run.

    train / eval: `datasets.Dataset` of tokenised rows (eval is None without `eval_dataset` or `val_size`).
    stats: number of dropped rows per reason, over every dataset loaded (empty when nothing was dropped).
    """

    train: datasets.Dataset
    eval: datasets.Dataset | None = None
    stats: dict[str, int] = field(default_factory=dict)


def _summary(counts: Counter) -> str:
    return ", ".join(f"{reason}: {n}" for reason, n in sorted(counts.items()))


def _media_base_dir(source: RawRows, data_args: DataArguments) -> str | None:
    """Where relative media paths start: `media_dir`, else the data file's folder (None for builtins)."""
    if data_args.media_dir:
        return data_args.media_dir
    if os.path.isdir(source.name):
        return source.name
    return os.path.dirname(os.path.abspath(source.name)) if os.path.isfile(source.name) else None


def _with_media(
    row: dict[str, Any], raw: dict[str, Any], media: MediaProcessor | None, stage: str, base_dir: str | None
) -> dict[str, Any]:
    """Attach a row's images / audio (markers expanded) for a multimodal model; a text model cannot take any."""
    if media is not None and stage != "ppo":
        return media.prepare_row(row, raw, base_dir)
    if has_media(raw):
        field = next(c for c in (IMAGE_COLUMN, AUDIO_COLUMN, VIDEO_COLUMN) if has_media({c: raw.get(c)}))
        why = "stage ppo takes text prompts only" if stage == "ppo" else (
            "the model is a text-only causal LM (or this command reads text only); train or evaluate a "
            "vision-language or audio-language model (e.g. `model_name_or_path: builtin:tiny-qwen2-vl`), or drop "
            "the column"
        )  # fmt: skip
        raise RowProblem(MEDIA_UNSUPPORTED, field, f"the row has `{field}` but {why}")
    return row


MAX_ROWS_NAMED = 5  # row numbers shown per reason in a stopping error


def _problem_summary(problems: dict[str, list[int]], unit: str = "row") -> str:
    """`empty response: 4 (rows 3, 9, 17, 20); wrong type: 1 (row 5)`, at most MAX_ROWS_NAMED numbers each."""
    parts = []
    for reason, indices in sorted(problems.items(), key=lambda item: item[1][0]):
        shown = ", ".join(map(str, indices[:MAX_ROWS_NAMED])) + (", ..." if len(indices) > MAX_ROWS_NAMED else "")
        parts.append(f"{reason}: {len(indices)} ({unit}{'s' if len(indices) > 1 else ''} {shown})")
    return "; ".join(parts)


def _readable_rows(source: RawRows, data_args: DataArguments, bad: Counter, purpose: Purpose) -> list[Any]:
    """Drop (and count) the unreadable lines of a JSON lines file, or stop with the lines named."""
    unreadable = [row for row in source.rows if isinstance(row, UnreadableLine)]
    if not unreadable:
        return source.rows
    if not data_args.skip_invalid_rows:
        shown = ", ".join(str(r.line) for r in unreadable[:MAX_ROWS_NAMED])
        shown += ", ..." if len(unreadable) > MAX_ROWS_NAMED else ""
        more = f" {len(unreadable)} of {len(source.rows)} lines are unreadable (lines {shown})."
        raise DataError(
            f"Data file {source.name!r} is neither a JSON array nor JSON lines (one object per line): "
            f"{unreadable[0].detail}.{more if len(unreadable) > 1 else ''} Fix the lines, or {purpose.skip} to "
            "drop them (they are counted in the log)."
        )
    bad[UNREADABLE] += len(unreadable)
    rows = [row for row in source.rows if not isinstance(row, UnreadableLine)]
    if not rows:
        raise DataError(f"Data file {source.name!r} has no readable line ({unreadable[0].detail}).")
    source.columns = _columns_of(rows)
    return rows


def _convert(
    source: RawRows,
    data_args: DataArguments,
    stage: str,
    media: MediaProcessor | None = None,
    purpose: Purpose = TRAINING,
) -> tuple[list[dict[str, Any]], Counter]:
    """Canonical rows of one file, and the count of its bad rows per reason (only with skip_invalid_rows).

    Without `skip_invalid_rows` every row is still checked, so that the error counts the bad rows per reason
    and names the first few of each: a user fixes the file once, not once per bad row.
    """
    bad: Counter = Counter()
    total = len(source.rows)
    raw_rows = _readable_rows(source, data_args, bad, purpose)
    fmt = data_args.dataset_format
    per_row: list[str | None] = [None] * len(raw_rows)
    if fmt == "auto":
        fmt, per_row = detect_rows_format(source.columns, raw_rows, source.name)
    else:
        check_columns(fmt, source.columns, source.name)
    if stage not in ("ppo", "sft", "kto") and fmt not in PAIRWISE_FORMATS:
        raise DataError(
            f"{source.name} holds prompts only (format `{fmt}`), but `stage: {stage}` trains on preference pairs. "
            "Use a pairwise dataset (prompt/chosen/rejected, sharegpt, hh-rlhf), or `stage: ppo` for prompts."
        )
    convert = to_prompt_row if stage == "ppo" else to_pairwise_row
    base_dir = _media_base_dir(source, data_args)
    rows: list[dict[str, Any]] = []
    problems: dict[str, list[int]] = {}
    first: tuple[int, RowProblem] | None = None
    for index, raw in enumerate(raw_rows):
        try:
            if per_row[index] is not None and per_row[index] != fmt:
                raise RowProblem(
                    OTHER_FORMAT, "(row)",
                    f"its columns ({', '.join(f'`{c}`' for c in raw)}) are those of format `{per_row[index]}`, but "
                    f"most rows of the file are `{fmt}`; a file holds one format (split it into two files)",
                )  # fmt: skip
            if isinstance(raw, dict):
                check_text(raw)
            if stage in ("sft", "kto"):  # one raw row may give two rows (`sft_responses: both`, KTO's unpairing)
                sft_rows = to_sft_rows(raw, fmt, data_args.sft_responses) if stage == "sft" else to_kto_rows(raw, fmt)
                rows += [_with_media(r, raw, None, stage, base_dir) for r in sft_rows]
                continue
            row = convert(raw, fmt)
            if stage == "rm":  # predictions.jsonl names each scored pair's origin
                row.update(source=source.name, source_row=index)
            rows.append(_with_media(row, raw, media, stage, base_dir) if isinstance(raw, dict) else row)
        except RowProblem as problem:
            bad[problem.reason] += 1
            problems.setdefault(problem.reason, []).append(index)
            if first is None:
                first = (index, problem)
    if first is not None and not data_args.skip_invalid_rows:
        index, problem = first
        n_bad = sum(len(v) for v in problems.values())
        summary = (f" {n_bad} of {len(raw_rows)} rows are invalid: {_problem_summary(problems)}."
                   if n_bad > 1 else "")  # fmt: skip
        raise DataError(
            f"{source.name}: row {index} (0-based), field `{problem.field}`: {problem.reason}: "
            f"{problem.detail} (format `{fmt}`).{summary} Fix or remove the rows, or {purpose.skip} to "
            "drop bad rows (they are counted per reason in the log)."
        )
    if bad:
        logger.warning(
            "Dropped %d of %d rows of %s as invalid (skip_invalid_rows: true): %s",
            sum(bad.values()), total, source.name, _summary(bad),
        )  # fmt: skip
    return rows, bad


def _canonical_rows(
    spec: str,
    data_args: DataArguments,
    stage: str,
    synthetic_seed: int,
    dropped: Counter,
    media: MediaProcessor | None = None,
    purpose: Purpose = TRAINING,
) -> list[dict[str, Any]]:
    """The canonical rows of one spec (a folder's files in order), its first `max_samples` raw rows only."""
    canonical: list[dict[str, Any]] = []
    taken = 0  # `max_samples` counts raw rows of the spec, not rows kept
    for source in read_dataset(spec, data_args, synthetic_seed):  # a file, folder, builtin or registry name
        if data_args.max_samples is not None:
            source.rows = source.rows[: max(0, data_args.max_samples - taken)]
            if not source.rows:
                break
        taken += len(source.rows)
        rows, bad = _convert(source, data_args, stage, media, purpose)
        dropped.update(bad)
        canonical += rows
    return canonical


def _log_cut(cut: Counter, total: int, spec: str, cutoff_len: int) -> None:
    """Say how many rows truncation shortened: a `cutoff_len` below the prompts' length cuts them silently."""
    if cut["prompt"] or cut["response"]:
        responses = f", {cut['response']} of {total} pairs' responses (cut from the right)" if cut["response"] else ""
        logger.warning(
            "cutoff_len %d shortened rows of %s: %d of %d prompts (cut from the left)%s. Raise `cutoff_len` to keep "
            "them whole.", cutoff_len, spec, cut["prompt"], total, responses,
        )  # fmt: skip


def _encode_rows(
    rows: list[dict[str, Any]],
    spec: str,
    data_args: DataArguments,
    tokenizer: PreTrainedTokenizerBase,
    stage: str,
    dropped: Counter,
    media: MediaProcessor | None = None,
) -> list[dict[str, Any]]:
    """Tokenise canonical rows; pairs whose response truncation would empty are dropped, counted and logged,
    and so are multimodal pairs whose prompt truncation would cut into the media placeholder tokens."""
    cut: Counter = Counter()
    if stage == "ppo":
        encoded_prompts = [encode_prompt(tokenizer, row, data_args.cutoff_len, cut) for row in rows]
        _log_cut(cut, len(rows), spec, data_args.cutoff_len)
        return encoded_prompts
    if stage in ("sft", "kto"):
        encoded = [encode_sft(tokenizer, row, data_args.cutoff_len) for row in rows]
    else:
        encoded = [encode_pair(tokenizer, row, data_args.cutoff_len, cut) for row in rows]
        _log_cut(cut, len(rows), spec, data_args.cutoff_len)
    kept = [row for row in encoded if row is not None]
    if len(kept) < len(rows):
        dropped[TRUNCATED] += len(rows) - len(kept)
        logger.warning(
            "Dropped %d rows of %s: %s (cutoff_len: %d).", len(rows) - len(kept), spec, TRUNCATED, data_args.cutoff_len
        )
    if media is not None:
        intact = [row for row in kept if media.tokens_intact(row)]
        if len(intact) < len(kept):
            dropped[MEDIA_TRUNCATED] += len(kept) - len(intact)
            logger.warning(
                "Dropped %d rows of %s: %s (cutoff_len: %d; raise it, or lower image_max_pixels).",
                len(kept) - len(intact), spec, MEDIA_TRUNCATED, data_args.cutoff_len,
            )  # fmt: skip
        kept = intact
    return kept


def _load(
    spec_list: str,
    key: str,
    data_args: DataArguments,
    tokenizer: PreTrainedTokenizerBase,
    stage: str,
    synthetic_seed: int,
    stats: Counter,
    media: MediaProcessor | None = None,
    purpose: Purpose = TRAINING,
) -> datasets.Dataset:
    """Every spec of one comma-separated config value (`key`), converted, checked and tokenised, as a Dataset."""
    import datasets

    dropped: Counter = Counter()
    encoded: list[dict[str, Any]] = []
    for spec in split_specs(spec_list):
        rows = _canonical_rows(spec, data_args, stage, synthetic_seed, dropped, media, purpose)
        encoded += _encode_rows(rows, spec, data_args, tokenizer, stage, dropped, media)
    stats.update(dropped)
    if not encoded:
        raise DataError(
            f"No usable rows are left in `{key}: {spec_list}` after dropping bad and truncated rows "
            f"({_summary(dropped) or 'none dropped'}). Check the data, `max_samples` and `cutoff_len`."
        )
    # Rows of different sources may lack some optional columns; fill them with None so Arrow can stack them.
    columns = list(dict.fromkeys(k for row in encoded for k in row))
    return datasets.Dataset.from_list([{c: row.get(c) for c in columns} for row in encoded])


def _split(train: datasets.Dataset, val_size: float, seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Hold out `val_size` rows (a fraction below 1, or a count) for evaluation, seeded."""
    test_size: float | int = val_size if val_size < 1 else int(val_size)
    try:
        parts = train.train_test_split(test_size=test_size, seed=seed, shuffle=True)
    except ValueError as e:
        raise DataError(
            f"`val_size: {val_size}` cannot split the {len(train)} training rows ({str(e).rstrip('.')}). Use a "
            "fraction below 1 or a row count smaller than the dataset, or give an `eval_dataset`."
        ) from None
    return parts["train"], parts["test"]


def get_dataset(
    data_args: DataArguments,
    tokenizer: PreTrainedTokenizerBase,
    stage: str,
    seed: int = 0,
    media: MediaProcessor | None = None,
    purpose: Purpose = TRAINING,
) -> DatasetBundle:
    """Load `dataset` (and `eval_dataset`, or a `val_size` split) as tokenised `datasets.Dataset`s.

    Args:
        data_args: the run's data keys.
        tokenizer: a Hugging Face tokenizer (its chat template is used when it has one).
        stage: "rm" or "dpo" (pairwise rows), "ppo" (prompt-only rows), "sft" (prompt + response rows) or "kto"
            (prompt + response + label rows, `data.kto`).
        seed: seed of the `val_size` split.
        media: the multimodal model's `MediaProcessor` (`model.media_processor`), or None for a text model. With
            it, rows may carry `images` / `audios`; their markers are expanded and the media references kept in
            the `images` / `audios` columns for the collator.
        purpose: what the rows are for, as the messages name them (`SCORING` for `discoalign score` / `bon`).

    Returns:
        DatasetBundle. A pairwise row holds `prompt_input_ids`, `chosen_input_ids`, `rejected_input_ids`,
        `margin`, the canonical `prompt`/`chosen`/`rejected` messages and any ground-truth columns;
        a prompt-only row holds `prompt_input_ids` and `prompt`.
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if not data_args.dataset:
        raise DataError(
            f"No training data: set the config key `dataset` to a data file, a folder, or {BUILTIN_SYNTHETIC}."
        )
    stats: Counter = Counter()
    train = _load(data_args.dataset, "dataset", data_args, tokenizer, stage, data_args.synthetic_seed, stats, media,
                  purpose)  # fmt: skip
    eval_set = None
    if data_args.eval_dataset:
        # builtin:synthetic as eval data uses the next seed, so it is held out from the training pairs.
        eval_set = _load(
            data_args.eval_dataset, "eval_dataset", data_args, tokenizer, stage, data_args.synthetic_seed + 1, stats,
            media, purpose,
        )  # fmt: skip
        if data_args.val_size:
            logger.warning("`val_size: %s` is ignored because `eval_dataset` is set.", data_args.val_size)
    elif data_args.val_size > 0:
        train, eval_set = _split(train, data_args.val_size, seed)
    logger.info(
        "Data: %d %s%s%s.", len(train), purpose.rows,
        "" if purpose is not TRAINING else f", {len(eval_set) if eval_set is not None else 'no'} eval rows",
        f"; dropped {_summary(stats)}" if stats else "",
    )  # fmt: skip
    return DatasetBundle(train=train, eval=eval_set, stats=dict(stats))
