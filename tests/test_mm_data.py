"""Multimodal data: media columns in each format, placeholder expansion, bad media, audio files, synthetic tasks."""

from __future__ import annotations

import json
import struct
import wave

import numpy as np
import pytest

from discoalign.config.schema import DataArguments, FinetuningArguments, ModelArguments
from discoalign.data import get_dataset
from discoalign.data import media as media_mod
from discoalign.data.checks import RowProblem
from discoalign.data.media import read_wav
from discoalign.data.synthetic_media import COLOURS, synthetic_audio_rows, synthetic_vl_rows
from discoalign.errors import DataError
from discoalign.models.loader import load_model_with_heads


@pytest.fixture(scope="module")
def vl():
    return load_model_with_heads(
        ModelArguments(model_name_or_path="builtin:tiny-qwen2-vl"), FinetuningArguments(), add_value_head=True,
        is_trainable=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def audio():
    return load_model_with_heads(
        ModelArguments(model_name_or_path="builtin:tiny-qwen2-audio"), FinetuningArguments(), add_value_head=True,
        is_trainable=False,
    )  # fmt: skip


def write_png(path, size=(56, 56), colour=(200, 20, 20)):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def write_pcm16_wav(path, samples: np.ndarray, rate: int, channels: int = 1):
    with wave.open(str(path), "wb") as f:
        f.setnchannels(channels)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return path


def write_float_wav(path, samples: np.ndarray, rate: int):
    data = samples.astype("<f4").tobytes()
    fmt = struct.pack("<HHIIHH", 3, 1, rate, rate * 4, 4, 32)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    return path


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def load(model_and_tokenizer, dataset: str, **data):
    model, tokenizer = model_and_tokenizer
    return get_dataset(DataArguments(dataset=dataset, **data), tokenizer, "rm", media=model.media_processor)


def prompt_text(tokenizer, row) -> str:
    return tokenizer.decode(row["prompt_input_ids"])


# ---- formats -------------------------------------------------------------------------------------------


def test_explicit_rows_with_relative_image_paths_expand_to_the_grid_token_count(vl, tmp_path):
    write_png(tmp_path / "img" / "big.png", (56, 56))  # 4 x 4 patches -> 4 tokens
    write_png(tmp_path / "img" / "small.png", (28, 28))  # 2 x 2 patches -> 1 token
    rows = [
        {"prompt": "<image>What colour?", "chosen": "Red.", "rejected": "Blue.", "images": ["img/big.png"]},
        {"prompt": "Compare <image> and <image>.", "chosen": "Same.", "rejected": "No.",
         "images": ["img/small.png", "img/big.png"]},
    ]  # fmt: skip
    bundle = load(vl, write_jsonl(tmp_path / "pairs.jsonl", rows))
    tokenizer = vl[1]
    first, second = bundle.train[0], bundle.train[1]
    pad = "<|image_pad|>"
    assert "<|vision_start|>" + pad * 4 + "<|vision_end|>What colour?" in prompt_text(tokenizer, first)
    assert ("Compare <|vision_start|>" + pad + "<|vision_end|> and <|vision_start|>" + pad * 4) in prompt_text(
        tokenizer, second
    )
    assert second["images"] == [
        {"path": str(tmp_path / "img" / "small.png"), "bytes": None},
        {"path": str(tmp_path / "img" / "big.png"), "bytes": None},
    ]


def test_sharegpt_rows_with_markers_and_media_dir(vl, tmp_path):
    write_png(tmp_path / "media" / "a.png")
    rows = [{
        "conversations": [{"from": "human", "value": "<image>Describe it."}],
        "chosen": {"from": "gpt", "value": "A red square."},
        "rejected": {"from": "gpt", "value": "A cat."},
        "images": ["a.png"],
    }]  # fmt: skip
    (tmp_path / "data").mkdir()
    bundle = load(vl, write_jsonl(tmp_path / "data" / "sg.jsonl", rows), media_dir=str(tmp_path / "media"))
    assert prompt_text(vl[1], bundle.train[0]).count("<|image_pad|>") == 4


def test_message_rows_with_typed_content_parts_and_inline_bytes(vl, tmp_path):
    png = (write_png(tmp_path / "x.png", (28, 56))).read_bytes()  # 2 x 4 patches -> 2 tokens
    rows = [{
        "prompt": [{"role": "user", "content": [{"type": "text", "text": "Colour of "}, {"type": "image"},
                                                {"type": "text", "text": "?"}]}],
        "chosen": [{"role": "assistant", "content": "Red."}],
        "rejected": [{"role": "assistant", "content": "Green."}],
        "images": [{"bytes": png, "path": None}],
    }]  # fmt: skip
    import datasets

    path = str(tmp_path / "rows.parquet")
    datasets.Dataset.from_list(rows).to_parquet(path)
    bundle = load(vl, path)
    assert "Colour of <|vision_start|><|image_pad|><|image_pad|><|vision_end|>?" in prompt_text(vl[1], bundle.train[0])


def test_a_row_without_markers_gets_its_images_before_the_first_user_turn(vl, tmp_path):
    write_png(tmp_path / "a.png", (28, 28))
    rows = [{"prompt": "What is it?", "chosen": "Red.", "rejected": "Blue.", "images": "a.png"}]
    text = prompt_text(vl[1], load(vl, write_jsonl(tmp_path / "p.jsonl", rows)).train[0])
    assert "user\n<|vision_start|><|image_pad|><|vision_end|>What is it?" in text


def test_audio_rows_from_wav_npy_and_arrays(audio, tmp_path):
    rate = 16000
    write_pcm16_wav(tmp_path / "half.wav", 0.3 * np.sin(np.arange(rate // 2) / 10.0), rate)  # 50 frames -> 12 tokens
    np.save(tmp_path / "full.npy", np.zeros(rate, dtype=np.float32) + 0.01)  # 100 frames -> 25 tokens
    rows = [
        {"prompt": "<audio>Pitch?", "chosen": "Low.", "rejected": "High.", "audios": ["half.wav"]},
        {"prompt": "<audio>Pitch?", "chosen": "Low.", "rejected": "High.", "audios": "full.npy"},
        {"prompt": "<audio>Pitch?", "chosen": "Low.", "rejected": "High.", "audios": [0.1] * 3200},  # 20 frames
    ]
    bundle = load(audio, write_jsonl(tmp_path / "a.jsonl", rows))
    counts = [prompt_text(audio[1], bundle.train[i]).count("<|AUDIO|>") for i in range(3)]
    assert counts == [12, 25, 5]
    assert "<|audio_bos|>" + "<|AUDIO|>" * 12 + "<|audio_eos|>Pitch?" in prompt_text(audio[1], bundle.train[0])


# ---- bad media -----------------------------------------------------------------------------------------


def test_a_missing_image_names_the_file_row_field_and_path(vl, tmp_path):
    write_png(tmp_path / "ok.png")
    rows = [
        {"prompt": "<image>Q", "chosen": "a", "rejected": "b", "images": ["ok.png"]},
        {"prompt": "<image>Q", "chosen": "a", "rejected": "b", "images": ["gone.png"]},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError, match=r"d\.jsonl.*row 1.*`images\[0\]`.*missing media file.*gone\.png"):
        load(vl, path)
    bundle = load(vl, path, skip_invalid_rows=True)
    assert len(bundle.train) == 1 and bundle.stats == {media_mod.MEDIA_MISSING: 1}


def test_a_corrupt_image_is_a_bad_row(vl, tmp_path):
    good = write_png(tmp_path / "good.png").read_bytes()
    (tmp_path / "broken.png").write_bytes(good[: len(good) // 2])  # truncated PNG
    (tmp_path / "text.png").write_text("not an image")
    rows = [{"prompt": "<image>Q", "chosen": "a", "rejected": "b", "images": [name]}
            for name in ("good.png", "broken.png", "text.png")]  # fmt: skip
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError, match=r"row 1.*`images\[0\]`.*unreadable media file.*broken\.png"):
        load(vl, path)
    assert load(vl, path, skip_invalid_rows=True).stats == {media_mod.MEDIA_UNREADABLE: 2}


def test_audio_with_the_wrong_sample_rate_is_a_bad_row(audio, tmp_path):
    write_pcm16_wav(tmp_path / "8k.wav", np.zeros(800), 8000)
    rows = [
        {"prompt": "<audio>Q", "chosen": "a", "rejected": "b", "audios": ["8k.wav"]},
        {"prompt": "<audio>Q", "chosen": "a", "rejected": "b", "audios": [{"array": [0.0] * 100, "sampling_rate": 44100}]},
        {"prompt": "<audio>Q", "chosen": "a", "rejected": "b", "audios": [{"array": [0.0] * 1600, "sampling_rate": 16000}]},
    ]  # fmt: skip
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError, match=r"row 0.*`audios\[0\]`.*wrong audio sample rate.*8k\.wav.*8000 Hz.*16000 Hz"):
        load(audio, path)
    bundle = load(audio, path, skip_invalid_rows=True)
    assert len(bundle.train) == 1 and bundle.stats == {media_mod.WRONG_SAMPLE_RATE: 2}


@pytest.mark.parametrize(
    ("row", "field", "reason"),
    [
        ({"prompt": "<image><image>Q", "images": ["a.png"]}, "images", media_mod.MEDIA_MISMATCH),
        ({"prompt": "Q", "chosen": "<image>a", "images": ["a.png"]}, "chosen", media_mod.MEDIA_MISMATCH),
        ({"prompt": "Q <|image_pad|>", "images": ["a.png"]}, "prompt", media_mod.MEDIA_MISMATCH),
        ({"prompt": "Q", "audios": ["a.wav"]}, "audios", media_mod.MEDIA_UNSUPPORTED),
        ({"prompt": "Q", "videos": ["a.mp4"]}, "videos", media_mod.MEDIA_UNSUPPORTED),
        ({"prompt": "Q", "images": [3]}, r"images\[0\]", "wrong type"),
    ],
)
def test_bad_media_rows_name_the_field(vl, tmp_path, row, field, reason):
    write_png(tmp_path / "a.png")
    path = write_jsonl(tmp_path / "d.jsonl", [{"chosen": "a", "rejected": "b", **row}])
    with pytest.raises(DataError, match=rf"row 0.*`{field}`.*{reason}"):
        load(vl, path)


def test_a_text_model_refuses_rows_with_images(tmp_path):
    write_png(tmp_path / "a.png")
    model, tokenizer = load_model_with_heads(
        ModelArguments(model_name_or_path="builtin:tiny-qwen3"), FinetuningArguments(), add_value_head=True
    )
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Q", "chosen": "a", "rejected": "b", "images": ["a.png"]}])
    with pytest.raises(DataError, match=r"row 0.*`images`.*text-only.*builtin:tiny-qwen2-vl"):
        get_dataset(DataArguments(dataset=path), tokenizer, "rm", media=model.media_processor)


def test_truncation_through_image_tokens_drops_and_counts_the_row(vl, tmp_path):
    write_png(tmp_path / "a.png", (112, 112))  # 16 image tokens
    rows = [{"prompt": "<image>" + "word " * 10, "chosen": "a", "rejected": "b", "images": ["a.png"]},
            {"prompt": "Q", "chosen": "a", "rejected": "b"}]  # fmt: skip
    bundle = load(vl, write_jsonl(tmp_path / "d.jsonl", rows), cutoff_len=24)
    assert len(bundle.train) == 1 and bundle.stats == {media_mod.MEDIA_TRUNCATED: 1}


# ---- audio files ---------------------------------------------------------------------------------------


def test_read_wav_decodes_pcm_and_float_and_averages_channels(tmp_path):
    samples = np.array([0.0, 0.5, -0.5, 0.25], dtype=np.float32)
    pcm, rate = read_wav(str(write_pcm16_wav(tmp_path / "a.wav", samples, 22050)))
    assert rate == 22050 and np.allclose(pcm[:, 0], samples, atol=1 / 32767)
    flt, rate = read_wav(str(write_float_wav(tmp_path / "f.wav", samples, 16000)))
    assert rate == 16000 and np.array_equal(flt[:, 0], samples)
    stereo = np.array([0.5, -0.5, 0.25, 0.25])  # interleaved L R L R
    write_pcm16_wav(tmp_path / "s.wav", stereo, 16000, channels=2)
    mono = media_mod.read_audio({"path": str(tmp_path / "s.wav"), "array": None, "sampling_rate": None}, "a", 16000)
    assert np.allclose(mono, [0.0, 0.25], atol=1e-4)


def test_unreadable_and_unsupported_audio_files(tmp_path):
    (tmp_path / "bad.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    (tmp_path / "x.flac").write_bytes(b"fLaC")
    for name, pattern in (("bad.wav", "no fmt or no data chunk"), ("x.flac", "soundfile|cannot be read")):
        with pytest.raises(RowProblem, match=pattern) as info:
            media_mod.read_audio({"path": str(tmp_path / name), "array": None}, "audios[0]", 16000)
        assert info.value.reason == media_mod.MEDIA_UNREADABLE and info.value.field == "audios[0]"


# ---- synthetic tasks -----------------------------------------------------------------------------------


def test_synthetic_vl_rows_know_the_answer():
    from io import BytesIO

    from PIL import Image

    rows = synthetic_vl_rows(24, seed=3)
    assert rows == synthetic_vl_rows(24, seed=3) and rows != synthetic_vl_rows(24, seed=4)
    sizes = set()
    for row in rows:
        image = np.asarray(Image.open(BytesIO(row["images"][0]["bytes"])))
        sizes.add(image.shape[:2])
        named = row["chosen"][0]["content"].split()[-1].rstrip(".")
        colour = np.array(COLOURS[named])
        fraction = float((image == colour).all(-1).mean())
        assert fraction == pytest.approx(row["true_reward_chosen"])
        if row["noise"] == 0.0:
            assert row["true_reward_chosen"] > 0.5 > row["true_reward_rejected"]
    assert len(sizes) > 1  # mixed image sizes


def test_synthetic_audio_rows_know_the_answer():
    rows = synthetic_audio_rows(12, seed=0)
    lengths = {len(r["audios"][0]["array"]) for r in rows}
    assert len(lengths) > 1 and all(n <= 16000 for n in lengths)
    for row in rows:
        samples = np.array(row["audios"][0]["array"])
        spectrum = np.abs(np.fft.rfft(samples))
        peak_hz = np.argmax(spectrum) * 16000 / len(samples)
        named = row["chosen"][0]["content"].split()[-1].rstrip(".")
        true_pitch = {220.0: "low", 440.0: "middle", 880.0: "high"}[
            min((220.0, 440.0, 880.0), key=lambda f: abs(f - peak_hz))
        ]
        assert (named == true_pitch) == (row["true_reward_chosen"] == 1.0)
        assert {row["true_reward_chosen"], row["true_reward_rejected"]} <= {0.0, 0.5, 1.0}


def test_builtin_synthetic_media_datasets_load(vl, audio):
    images = load(vl, "builtin:synthetic-vl", synthetic_num_pairs=4)
    tones = load(audio, "builtin:synthetic-audio", synthetic_num_pairs=4)
    assert len(images.train) == 4 and len(tones.train) == 4
    assert all(row["images"][0]["bytes"] for row in images.train)
    assert {"true_reward_chosen", "noise", "topic"} <= set(tones.train.column_names)


def test_token_counts_agree_with_the_processed_grids(vl):
    from PIL import Image

    media = vl[0].media_processor
    images = [Image.new("RGB", size) for size in ((28, 28), (56, 28), (30, 100), (112, 112), (300, 40), (9, 9))]
    grids = media.image_inputs(images)["image_grid_thw"]
    assert media.image_token_counts(images) == (grids.prod(-1) // 4).tolist()
