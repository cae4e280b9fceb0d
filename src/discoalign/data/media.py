"""Reading the images and audio a data row names, without torchvision or torchaudio.

A row's `images` (LlamaFactory's column name) is a path, a list of paths, or `{"bytes": ..., "path": ...}`
objects (what a `datasets` Image column holds); `audios` is a path (.wav, .npy, or .flac when `soundfile` is
installed), a list of them, a list of numbers (one waveform at the model's sampling rate), or
`{"array": [...], "sampling_rate": n}` objects (a `datasets` Audio column). Relative paths start from
`media_dir`, else from the data file's folder.

References are normalised (`image_refs`, `audio_refs`) to dicts that a `datasets.Dataset` can hold, so the
collator can read the media again for each batch instead of storing decoded pixels or waveforms.

Every problem is a `RowProblem` naming the field and the path: the pipeline stops on it with the file and
row, or drops and counts the row under `skip_invalid_rows: true`.
"""

from __future__ import annotations

import io
import os
import struct
from typing import Any

import numpy as np

from .checks import WRONG_TYPE, RowProblem

MEDIA_MISSING = "missing media file"
MEDIA_UNREADABLE = "unreadable media file"
WRONG_SAMPLE_RATE = "wrong audio sample rate"
MEDIA_MISMATCH = "media markers do not match the media"
MEDIA_UNSUPPORTED = "media the model cannot take"
MEDIA_TRUNCATED = "media tokens cut by cutoff_len"

IMAGE_COLUMN = "images"
AUDIO_COLUMN = "audios"
VIDEO_COLUMN = "videos"
AUDIO_EXTENSIONS = (".wav", ".npy", ".flac")


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _resolve(path: str, base_dir: str | None) -> str:
    path = os.path.expanduser(path)
    return path if os.path.isabs(path) or not base_dir else os.path.join(base_dir, path)


def has_media(row: dict[str, Any]) -> bool:
    """Whether a raw row names any image, audio or video."""
    return any(_as_list(row.get(column)) for column in (IMAGE_COLUMN, AUDIO_COLUMN, VIDEO_COLUMN))


# ---- references ------------------------------------------------------------------------------------


def image_refs(value: Any, base_dir: str | None, field: str = IMAGE_COLUMN) -> list[dict[str, Any]]:
    """A row's `images` value -> `[{"path": str | None, "bytes": bytes | None}, ...]` (paths made absolute)."""
    refs = []
    for i, item in enumerate(_as_list(value)):
        where = f"{field}[{i}]"
        if isinstance(item, str):
            refs.append({"path": os.path.abspath(_resolve(item, base_dir)), "bytes": None})
        elif isinstance(item, dict) and (item.get("bytes") is not None or item.get("path")):
            data = item.get("bytes")
            if data is not None and not isinstance(data, (bytes, bytearray)):
                raise RowProblem(WRONG_TYPE, where, f"`bytes` must hold the encoded image, got {type(data).__name__}")
            path = item.get("path")
            if data is None:
                refs.append({"path": os.path.abspath(_resolve(path, base_dir)), "bytes": None})
            else:  # the bytes are the image; a path beside them is only its name
                refs.append({"path": path, "bytes": bytes(data)})
        else:
            raise RowProblem(
                WRONG_TYPE, where, f"expected an image path or {{bytes, path}} object, got {type(item).__name__}"
            )
    return refs


def _is_number_list(value: Any) -> bool:
    return (
        isinstance(value, (list, tuple))
        and bool(value)
        and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value)
    )


def audio_refs(value: Any, base_dir: str | None, field: str = AUDIO_COLUMN) -> list[dict[str, Any]]:
    """A row's `audios` value -> `[{"path": str | None, "array": list | None, "sampling_rate": int | None}, ...]`."""
    items = [value] if _is_number_list(value) else _as_list(value)
    refs = []
    for i, item in enumerate(items):
        where = f"{field}[{i}]"
        if isinstance(item, str):
            refs.append({"path": os.path.abspath(_resolve(item, base_dir)), "array": None, "sampling_rate": None})
        elif _is_number_list(item) or isinstance(item, np.ndarray):
            refs.append(
                {"path": None, "array": [float(x) for x in np.asarray(item).reshape(-1)], "sampling_rate": None}
            )
        elif isinstance(item, dict) and (item.get("array") is not None or item.get("path")):
            rate = item.get("sampling_rate")
            if rate is not None and (isinstance(rate, bool) or not isinstance(rate, (int, float))):
                raise RowProblem(WRONG_TYPE, f"{where}.sampling_rate", f"expected a number, got {type(rate).__name__}")
            array = item.get("array")
            if array is not None and not (_is_number_list(array) or isinstance(array, np.ndarray)):
                raise RowProblem(WRONG_TYPE, f"{where}.array", "expected a list of numbers (one waveform)")
            rate = int(rate) if rate is not None else None
            if array is None:
                refs.append(
                    {"path": os.path.abspath(_resolve(item["path"], base_dir)), "array": None, "sampling_rate": rate}
                )
            else:
                samples = [float(x) for x in np.asarray(array).reshape(-1)]
                refs.append({"path": None, "array": samples, "sampling_rate": rate})
        else:
            raise RowProblem(
                WRONG_TYPE, where,
                f"expected an audio path, a list of samples or an {{array, sampling_rate}} object, got {type(item).__name__}",
            )  # fmt: skip
    return refs


def describe(ref: dict[str, Any]) -> str:
    """How error messages name a media reference."""
    return repr(ref["path"]) if ref.get("path") else "(inline data)"


# ---- images ----------------------------------------------------------------------------------------


def _fit_pixels(image, max_pixels: int, min_pixels: int):
    """Scale down above `max_pixels`, up below `min_pixels`, keeping the aspect ratio (LlamaFactory's rule)."""
    import math

    from PIL import Image

    width, height = image.size
    pixels = width * height
    if pixels > max_pixels:
        factor = math.sqrt(max_pixels / pixels)
    elif pixels < min_pixels:
        factor = math.sqrt(min_pixels / pixels)
    else:
        return image
    size = (max(1, int(width * factor)), max(1, int(height * factor)))
    return image.resize(size, resample=Image.Resampling.BICUBIC)


def open_image(ref: dict[str, Any], field: str, max_pixels: int, min_pixels: int):
    """The referenced image as an RGB `PIL.Image`, fitted into [min_pixels, max_pixels]."""
    from PIL import Image, UnidentifiedImageError

    path = ref.get("path")
    if ref.get("bytes") is None and not os.path.isfile(path):
        raise RowProblem(MEDIA_MISSING, field, f"the image file {path!r} does not exist")
    try:
        source = io.BytesIO(ref["bytes"]) if ref.get("bytes") is not None else path
        with Image.open(source) as image:
            image.load()  # decode now: a truncated or corrupt file fails here, not inside a training step
            rgb = image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise RowProblem(MEDIA_UNREADABLE, field, f"the image {describe(ref)} cannot be decoded ({e})") from None
    return _fit_pixels(rgb, max_pixels, min_pixels)


# ---- audio -----------------------------------------------------------------------------------------

_WAVE_PCM, _WAVE_FLOAT, _WAVE_EXTENSIBLE = 1, 3, 0xFFFE


def read_wav(path: str) -> tuple[np.ndarray, int]:
    """A RIFF/WAVE file (integer PCM of 8-32 bits, or 32/64-bit float) -> (samples (frames, channels) float32
    in [-1, 1], sample rate). Raises ValueError for anything else."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise ValueError("not a RIFF/WAVE file")
    fmt, samples, offset = None, None, 12
    while offset + 8 <= len(data):
        chunk_id, size = data[offset : offset + 4], struct.unpack("<I", data[offset + 4 : offset + 8])[0]
        body = data[offset + 8 : offset + 8 + size]
        if chunk_id == b"fmt ":
            if len(body) < 16:
                raise ValueError("the fmt chunk is too short")
            code, channels, rate, _, _, bits = struct.unpack("<HHIIHH", body[:16])
            if code == _WAVE_EXTENSIBLE and len(body) >= 26:
                code = struct.unpack("<H", body[24:26])[0]  # first two bytes of the sub-format GUID
            fmt = (code, channels, rate, bits)
        elif chunk_id == b"data":
            samples = body
        offset += 8 + size + (size & 1)  # chunks are word-aligned
    if fmt is None or samples is None:
        raise ValueError("the file has no fmt or no data chunk")
    code, channels, rate, bits = fmt
    if channels < 1:
        raise ValueError("the file declares no channels")
    width = bits // 8
    usable = len(samples) - len(samples) % (width * channels)
    raw = samples[:usable]
    if code == _WAVE_FLOAT and bits in (32, 64):
        array = np.frombuffer(raw, dtype=f"<f{width}").astype(np.float32)
    elif code == _WAVE_PCM and bits == 8:
        array = (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    elif code == _WAVE_PCM and bits in (16, 32):
        array = np.frombuffer(raw, dtype=f"<i{width}").astype(np.float32) / float(2 ** (bits - 1))
    elif code == _WAVE_PCM and bits == 24:
        triples = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        ints = triples[:, 0] | (triples[:, 1] << 8) | (triples[:, 2] << 16)
        ints = np.where(ints >= 1 << 23, ints - (1 << 24), ints)
        array = ints.astype(np.float32) / float(1 << 23)
    else:
        raise ValueError(f"unsupported WAVE encoding (format code {code}, {bits} bits)")
    return array.reshape(-1, channels), rate


def _read_audio_file(path: str) -> tuple[np.ndarray, int | None]:
    """(samples, rate) of a file; rate None for `.npy` (assumed to be at the model's rate)."""
    ext = os.path.splitext(path)[1].lower()
    if ext == ".wav":
        return read_wav(path)
    if ext == ".npy":
        return np.load(path, allow_pickle=False).astype(np.float32), None
    if ext == ".flac":
        try:
            import soundfile
        except ImportError:
            raise ValueError(
                "reading .flac needs the `soundfile` package (pip install soundfile); or convert the file to .wav"
            ) from None
        array, rate = soundfile.read(path, dtype="float32", always_2d=True)
        return array, int(rate)
    raise ValueError(f"unknown audio extension {ext or '(none)'!r}; supported: {', '.join(AUDIO_EXTENSIONS)}")


def read_audio(ref: dict[str, Any], field: str, sampling_rate: int) -> np.ndarray:
    """The referenced audio as a mono float32 waveform (samples,) at `sampling_rate`.

    Multi-channel audio is averaged to mono. A file or object whose declared rate differs from
    `sampling_rate` is a bad row (resampling needs librosa/torchaudio, which this project does not require).
    """
    path = ref.get("path")
    if ref.get("array") is not None:
        array, rate = np.asarray(ref["array"], dtype=np.float32), ref.get("sampling_rate")
    else:
        if not os.path.isfile(path):
            raise RowProblem(MEDIA_MISSING, field, f"the audio file {path!r} does not exist")
        try:
            array, rate = _read_audio_file(path)
        except (OSError, ValueError, struct.error) as e:
            raise RowProblem(MEDIA_UNREADABLE, field, f"the audio file {path!r} cannot be read ({e})") from None
    if rate is not None and int(rate) != int(sampling_rate):
        raise RowProblem(
            WRONG_SAMPLE_RATE, field,
            f"the audio {describe(ref)} is sampled at {int(rate)} Hz but the model's feature extractor expects "
            f"{int(sampling_rate)} Hz; resample it (e.g. `librosa.resample` or `sox in.wav -r {int(sampling_rate)} "
            "out.wav`)",
        )  # fmt: skip
    if array.ndim == 2:
        array = array.mean(axis=1)
    if array.ndim != 1 or array.size == 0:
        raise RowProblem(MEDIA_UNREADABLE, field, f"the audio {describe(ref)} holds no samples (shape {array.shape})")
    if not np.isfinite(array).all():
        raise RowProblem(MEDIA_UNREADABLE, field, f"the audio {describe(ref)} holds NaN or infinite samples")
    return array.astype(np.float32)
