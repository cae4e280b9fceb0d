"""User-facing errors. The CLI prints their message as one paragraph and exits with code 2."""


class DiscoAlignError(Exception):
    """Base class of mistakes a user can fix (bad config, bad data, bad checkpoint)."""

    exit_code = 2


class ConfigError(DiscoAlignError):
    """A config key is unknown, has a bad value, or contradicts another key."""


class DataError(DiscoAlignError):
    """A data file cannot be read, has an unknown format, or has a bad row."""


class CheckpointError(DiscoAlignError):
    """A model or head checkpoint is missing, unreadable or inconsistent."""
