"""Run configuration: flat YAML keys, overrides, validation."""

from .loader import RunConfig, build_config, load_config

__all__ = ["RunConfig", "build_config", "load_config"]
