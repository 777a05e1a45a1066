"""Errors that mean: something outside the relay must be fixed before it can run."""


class StartupError(RuntimeError):
    """The relay cannot start (a missing stream, a denied permission, no credentials...).
    The message says what to fix; the CLI prints it and exits 1, without a traceback."""


class StoreMissing(StartupError):
    """A membership store opened without creating it (``segment-relay state``, a dry run) is not there."""
