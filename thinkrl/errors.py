"""Errors that the CLI turns into one-line messages (no traceback): each says what to fix."""


class ThinkRLError(Exception):
    """Base class: a user-facing problem whose message names the fix."""


class ConfigError(ThinkRLError):
    """A malformed or impossible configuration."""


class DataError(ThinkRLError):
    """A missing, empty or malformed data file."""


class ModelLoadError(ThinkRLError):
    """A model or tokenizer that cannot be found or loaded."""


class NonFiniteLossError(ThinkRLError):
    """The loss became NaN/inf; the run stops before the bad update touches weights or checkpoints."""


class StorageFullError(ThinkRLError):
    """The disk (or a file-size limit) refused a checkpoint; the half-written one is removed, earlier ones kept."""
