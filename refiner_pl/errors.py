"""The one exception type for bad user input.

`cli.py` prints it as a single `error: ...` line and exits with status 2, before any work
starts, so every check that raises it must run at construction time.
"""


class UserInputError(ValueError):
    """A value the user gave is wrong; the message names the problem and the fix."""
