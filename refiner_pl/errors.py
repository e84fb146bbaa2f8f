"""The one exception type for bad user input, and how the entry points report it.

`cli.py`, ``python -m refiner_pl.export`` and ``python -m refiner_pl.analysis.compare`` print
it as a single `error: ...` line and exit with status 2, before any work starts, so every
check that raises it must run at construction time.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager


class UserInputError(ValueError):
    """A value the user gave is wrong; the message names the problem and the fix."""


def find_user_error(err: BaseException | None) -> UserInputError | None:
    """The UserInputError behind `err` (jsonargparse wraps errors raised while instantiating)."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, UserInputError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def user_message(error: UserInputError) -> str:
    """The error's own message, also when a DataLoader worker raised it.

    torch re-raises a worker's exception in the main process with the worker's whole
    traceback as its text; the message is the last line, after the exception's name.
    """
    text = str(error)
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = text.rstrip().splitlines()[-1]
        name, _, message = last.partition(": ")
        if message and name.endswith(type(error).__name__):
            return message
    return text


@contextmanager
def reporting_user_errors() -> Iterator[None]:
    """Turns a `UserInputError` (however wrapped) into one ``error:`` line and exit status 2;
    any other exception propagates with its traceback."""
    try:
        yield
    except Exception as err:
        user_error = find_user_error(err)
        if user_error is None:
            raise
        print(f"error: {user_message(user_error)}", file=sys.stderr)
        raise SystemExit(2) from None
