"""The one error type for bad user input; scripts print it as `error: <message>` (sae/util/cli.py)."""


class InputError(ValueError):
    """Bad user input (flags, files, data). Its message is one line shown to the user as is."""
