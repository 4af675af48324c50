"""Errors a user can act on.

Every error raised for bad input derives from :class:`FuselabError`. Its message names the problem and the
fix; the CLI prints it on one line without a traceback (``FUSELAB_DEBUG=1`` shows the traceback).
"""


class FuselabError(Exception):
    """An error caused by the user's input, with a message that says how to fix it."""


class ConfigError(FuselabError):
    """A recipe or option is invalid (unknown key, wrong type, impossible value)."""


class ModelNotFoundError(FuselabError):
    """A model reference does not resolve to a checkpoint on disk."""


class IncompatibleModelsError(FuselabError):
    """Inputs that must agree (architecture, tensor names, shapes, vocabulary) do not."""


class NonFiniteError(FuselabError):
    """A tensor holds NaN or infinity."""


class OutputExistsError(FuselabError):
    """The output folder exists and ``--force`` was not given."""


class OutputLockedError(FuselabError):
    """Another live fuselab process is writing the same output."""


class OutputNotWritableError(FuselabError):
    """The output cannot be written: a read-only or full file system, or missing permissions."""
