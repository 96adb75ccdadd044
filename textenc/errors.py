"""Typed errors raised by textenc.

Every error is a subclass of :class:`TextencError`, itself a :class:`ValueError`,
so callers can catch broadly (``except ValueError``) or narrowly (``except
PromptError``). Messages name the offending thing (prompt fragment and position,
file path, key, expected versus got) and say how to fix it.

Warnings that let work go on (a missing embedding, for instance) use
:class:`TextencWarning` subclasses so they can be filtered or turned into errors
with the standard :mod:`warnings` machinery.
"""

from __future__ import annotations

__all__ = [
    "TextencError",
    "PromptError",
    "EmbeddingError",
    "CheckpointError",
    "ConfigError",
    "BackendUnavailableError",
    "DiffusersLayoutError",
    "DatasetError",
    "ImageError",
    "ConditioningError",
    "LayerError",
    "TextencWarning",
    "EmbeddingWarning",
    "PromptWarning",
    "EncodeError",
    "CheckpointWarning",
    "DatasetIncompleteError",
    "DatasetWarning",
]


class TextencError(ValueError):
    """Base class of every error textenc raises on bad input."""


class PromptError(TextencError):
    """A prompt could not be parsed or tokenized (bad weight, too long, ...)."""


class EmbeddingError(TextencError):
    """A textual-inversion file is unsafe, unreadable or malformed."""


class CheckpointError(TextencError):
    """A checkpoint file is unreadable, truncated, unsafe or has the wrong keys."""


class ConfigError(TextencError):
    """A model config is missing a key, has an unknown key or a bad value."""


class BackendUnavailableError(TextencError):
    """An attention backend was requested that cannot run here."""


class DiffusersLayoutError(CheckpointError):
    """A diffusers model folder is not a supported Stable Diffusion layout."""


class DatasetError(TextencError):
    """A caption dataset or an output folder cannot be used as asked."""


class TextencWarning(UserWarning):
    """Base class of textenc's warnings."""


class EmbeddingWarning(TextencWarning):
    """An embedding named in a prompt was skipped (missing, wrong width, ...)."""


class ImageError(TextencError):
    """An image tensor has the wrong layout, range or shape."""


class ConditioningError(TextencError):
    """A CONDITIONING list is malformed (not ``[[cond, {...}], ...]``)."""


class LayerError(PromptError):
    """A clip-skip count or layer index is not valid for the model's depth."""


class PromptWarning(TextencWarning):
    """A prompt is encoded, but something in it deserves a look (a very large weight)."""


class EncodeError(TextencError):
    """An encode produced NaN or infinite conditioning; the message names the likely cause."""


class CheckpointWarning(TextencWarning):
    """A checkpoint loaded, but held something that was ignored (a stray key)."""


class DatasetIncompleteError(DatasetError):
    """An encoded dataset folder is read before its run finished every shard."""


class DatasetWarning(TextencWarning):
    """An encoded dataset folder is read as asked, but not all of it is there."""
