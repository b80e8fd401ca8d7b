"""Exceptions whose message is the one line a user sees: what went wrong, in which file, and the fix."""

from __future__ import annotations


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name when empty): for one-line errors wrapping another."""
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


class PipelineError(Exception):
    """Base class: the message is a complete, single-line explanation meant for the user."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


class SlideError(PipelineError):
    """A slide cannot be opened or read (missing, empty, truncated, unsupported format)."""


class MissingMPPError(SlideError):
    """The slide's resolution is unknown and no override was given."""


class ConfigError(PipelineError):
    """A configuration file or sample sheet is invalid."""


class EncoderError(PipelineError):
    """An encoder cannot be built or loaded (missing weights, remote code not allowed, ...)."""


class FeatureError(PipelineError):
    """Features cannot be computed or stored (non-finite values, tiles that fail to decode, ...)."""


class TrainingDataError(PipelineError):
    """Labels, splits or bags are not usable for training (missing features, too few samples, ...)."""
