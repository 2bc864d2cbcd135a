"""The one exception type the CLI and UI turn into a one-line message."""


class LocalmoeError(Exception):
    """A problem the user can act on; its message is shown as is, without a traceback."""

    exit_code = 1


class UsageError(LocalmoeError):
    """Bad input on the command line (empty prompt, unknown model id)."""

    exit_code = 2


class PromptTooLong(UsageError):
    """A question over the length any model here could read (the server answers it as context_length_exceeded)."""
