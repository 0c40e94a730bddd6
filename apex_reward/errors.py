"""Typed errors raised by apex-reward.

Every error names the offending value (a path, a field, a shape) and what was expected, so a
batch job can record it per item and a CLI can print it without a traceback.
"""

from __future__ import annotations


class ApexError(Exception):
    """Base class of every error apex-reward raises on purpose."""


class AudioError(ApexError, ValueError):
    """Audio that cannot be scored. ``source`` names the file or input index."""

    def __init__(self, message: str, source: str | None = None) -> None:
        self.source = source
        self.reason = message
        super().__init__(f"{source}: {message}" if source else message)


class AudioDecodeError(AudioError):
    """The file is missing, unreadable, truncated, or not audio."""


class EmptyAudioError(AudioError):
    """The audio has no samples (or no channels)."""


class NonFiniteAudioError(AudioError):
    """The audio contains NaN or infinite samples."""


class AudioTooShortError(AudioError):
    """The audio is shorter than the configured minimum duration."""


class AudioTooLongError(AudioError):
    """The audio is longer than the configured maximum duration."""


class AudioShapeError(AudioError):
    """A waveform tensor or array has a shape the front end does not accept."""


class AudioRangeError(AudioError):
    """Finite sample values too large to process (far outside [-1, 1], e.g. 1e20)."""


class UnsupportedSampleRateError(AudioError):
    """The sample rate is outside what the front end (or a server's ``--sample-rates``) takes."""


class ConfigError(ApexError, ValueError):
    """A configuration (``config.json``, YAML, CLI flags) has a missing, unknown or invalid field."""


class UnknownConditionError(ConfigError):
    """A condition (e.g. a platform) that a conditioned checkpoint was not trained on, or a
    condition given to a checkpoint without conditioning; the message names the known values."""


class CheckpointError(ApexError, OSError):
    """A checkpoint directory is missing files, or its weights are truncated or do not match."""


class DataIntegrityError(ApexError, OSError):
    """A stored data file (an embedding shard) no longer matches the checksum recorded when it
    was written; the message names the file and how to regenerate it."""


class MissingDependencyError(ApexError, ImportError):
    """An optional dependency is not installed; the message names the extra that provides it."""


def require(module: str, extra: str, feature: str | None = None):
    """Import ``module`` or raise :class:`MissingDependencyError` naming the pip extra to install.

    Returns the imported module.
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        what = feature or module
        raise MissingDependencyError(
            f"{what} needs the optional dependency {module!r}: pip install 'apex-reward[{extra}]'"
        ) from e


#: The error classes above by name: the ``error_type`` strings that score results, the score
#: cache and the server carry, mapped back to their classes without looking names up in a module.
ERROR_TYPES: dict[str, type[ApexError]] = {
    cls.__name__: cls
    for cls in (
        ApexError,
        AudioError,
        AudioDecodeError,
        EmptyAudioError,
        NonFiniteAudioError,
        AudioTooShortError,
        AudioTooLongError,
        AudioShapeError,
        AudioRangeError,
        UnsupportedSampleRateError,
        ConfigError,
        UnknownConditionError,
        CheckpointError,
        DataIntegrityError,
        MissingDependencyError,
    )
}


def error_class(error_type: str | None) -> type[ApexError] | None:
    """The class named by an ``error_type`` string (see :data:`ERROR_TYPES`), or None for any
    other name (a built-in exception such as ``RuntimeError``, or nothing)."""
    return ERROR_TYPES.get(error_type or "")
