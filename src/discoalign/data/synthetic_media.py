"""`builtin:synthetic-vl` and `builtin:synthetic-audio`: preference tasks over images / tones with a known answer.

* synthetic-vl: each image is filled with a dominant colour, with a rectangle of a second colour covering
  10-40% of it; sizes vary (28 or 56 pixels a side). The prompt asks for the main colour; a response naming a
  colour is worth the fraction of the image in that colour (so the right answer is worth 0.6-0.9, naming the
  rectangle's colour 0.1-0.4, a colour that is absent 0).
* synthetic-audio: each clip is a pure tone, low (220 Hz), middle (440 Hz) or high (880 Hz), 0.25-1 s long at
  16 kHz. A response naming the pitch is worth 1 - (octaves away) / 2: right 1.0, one octave off 0.5, two 0.

As in `builtin:synthetic`, the prompt's phrasing is a topic with its own label-noise level (the annotator
prefers the worse response with that probability), and every row stores `true_reward_chosen`,
`true_reward_rejected`, `noise` and `topic`. Media are inline (PNG bytes, sample arrays), so no files are
written. Deterministic for a seed (Python's `random.Random`, never the global RNG).
"""

from __future__ import annotations

import io
import math
import random
from typing import Any

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 215, 40),
    "purple": (140, 60, 170),
    "orange": (240, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
IMAGE_SIDES = (28, 56)
VL_TOPICS: dict[str, tuple[str, float]] = {  # topic -> (question, label-noise probability)
    "plain": ("What is the main colour of this picture?", 0.0),
    "casual": ("Which colour do you see most?", 0.1),
    "hard": ("Name the colour that covers most of the image.", 0.25),
}

SAMPLING_RATE = 16000
PITCHES: dict[str, float] = {"low": 220.0, "middle": 440.0, "high": 880.0}
TONE_SECONDS = (0.25, 0.5, 0.75, 1.0)
AUDIO_TOPICS: dict[str, tuple[str, float]] = {
    "plain": ("Is this tone low, middle or high?", 0.0),
    "casual": ("How high does this sound?", 0.1),
    "hard": ("Describe the pitch of the tone.", 0.25),
}


def _png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def _colour_image(rng: random.Random, main: str, other: str) -> tuple[bytes, float]:
    """PNG bytes of a `main`-coloured image with an `other`-coloured rectangle, and the rectangle's area fraction."""
    width, height = rng.choice(IMAGE_SIDES), rng.choice(IMAGE_SIDES)
    pixels = np.empty((height, width, 3), dtype=np.uint8)
    pixels[:] = COLOURS[main]
    target = rng.uniform(0.1, 0.4)
    rect_w = max(1, min(width, round(width * math.sqrt(target))))
    rect_h = max(1, min(height, round(width * height * target / rect_w)))
    top, left = rng.randrange(height - rect_h + 1), rng.randrange(width - rect_w + 1)
    pixels[top : top + rect_h, left : left + rect_w] = COLOURS[other]
    return _png(pixels), rect_w * rect_h / (width * height)


def _noisy_pair(rng: random.Random, better: tuple[str, float], worse: tuple[str, float], noise: float):
    """(chosen, rejected) with the label flipped with probability `noise`."""
    return (worse, better) if rng.random() < noise else (better, worse)


def synthetic_vl_rows(num_pairs: int, seed: int) -> list[dict[str, Any]]:
    """`num_pairs` pairwise rows with one inline image each (`images: [{"bytes": png, "path": None}]`)."""
    rng = random.Random(seed)
    names = list(COLOURS)
    topics = list(VL_TOPICS)
    rows = []
    for i in range(num_pairs):
        topic = topics[i % len(topics)]
        question, noise = VL_TOPICS[topic]
        main, other = rng.sample(names, 2)
        png, other_fraction = _colour_image(rng, main, other)
        wrong = rng.choice([n for n in names if n != main])
        wrong_reward = other_fraction if wrong == other else 0.0
        (chosen, r_c), (rejected, r_r) = _noisy_pair(rng, (main, 1.0 - other_fraction), (wrong, wrong_reward), noise)
        rows.append(
            {
                "prompt": [{"role": "user", "content": f"<image>{question}"}],
                "chosen": [{"role": "assistant", "content": f"It is mostly {chosen}."}],
                "rejected": [{"role": "assistant", "content": f"It is mostly {rejected}."}],
                "images": [{"bytes": png, "path": None}],
                "true_reward_chosen": r_c,
                "true_reward_rejected": r_r,
                "noise": noise,
                "topic": topic,
            }
        )
    return rows


def tone(frequency: float, seconds: float, sampling_rate: int = SAMPLING_RATE) -> list[float]:
    """A sine tone of amplitude 0.5 with 10 ms fades (no clicks), as a list of samples."""
    n = int(round(seconds * sampling_rate))
    t = np.arange(n, dtype=np.float64) / sampling_rate
    fade = np.minimum(1.0, np.minimum(t, t[::-1]) / 0.01)
    return (0.5 * fade * np.sin(2 * np.pi * frequency * t)).astype(np.float32).tolist()


def _pitch_reward(named: str, actual: str) -> float:
    octaves = abs(math.log2(PITCHES[named] / PITCHES[actual]))
    return 1.0 - octaves / 2.0


def synthetic_audio_rows(num_pairs: int, seed: int) -> list[dict[str, Any]]:
    """`num_pairs` pairwise rows with one inline 16 kHz tone each (`audios: [{"array", "sampling_rate"}]`)."""
    rng = random.Random(seed)
    names = list(PITCHES)
    topics = list(AUDIO_TOPICS)
    rows = []
    for i in range(num_pairs):
        topic = topics[i % len(topics)]
        question, noise = AUDIO_TOPICS[topic]
        actual = rng.choice(names)
        wrong = rng.choice([n for n in names if n != actual])
        samples = tone(PITCHES[actual], rng.choice(TONE_SECONDS))
        better, worse = (actual, 1.0), (wrong, _pitch_reward(wrong, actual))
        (chosen, r_c), (rejected, r_r) = _noisy_pair(rng, better, worse, noise)
        rows.append(
            {
                "prompt": [{"role": "user", "content": f"<audio>{question}"}],
                "chosen": [{"role": "assistant", "content": f"The tone is {chosen}."}],
                "rejected": [{"role": "assistant", "content": f"The tone is {rejected}."}],
                "audios": [{"path": None, "array": samples, "sampling_rate": SAMPLING_RATE}],
                "true_reward_chosen": r_c,
                "true_reward_rejected": r_r,
                "noise": noise,
                "topic": topic,
            }
        )
    return rows
