"""The one exception type for bad user input, and how the entry points report it.

`cli.py`, ``python -m refiner_pl.export`` and ``python -m refiner_pl.analysis.compare`` print
it as a single `error: ...` line and exit with status 2, before any work starts, so every
check that raises it must run at construction time.
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from lightning.pytorch.utilities import rank_zero_only

# Storage failures a user fixes by pointing the run elsewhere or freeing space.
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)


class UserInputError(ValueError):
    """A value the user gave is wrong; the message names the problem and the fix."""


def find_user_error(err: BaseException | None) -> UserInputError | None:
    """The UserInputError behind `err` (jsonargparse wraps errors raised while instantiating)."""
    return next((cause for cause in _causes(err) if isinstance(cause, UserInputError)), None)


def _causes(err: BaseException | None) -> Iterator[BaseException]:
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        yield err
        seen.add(id(err))
        err = err.__cause__ or err.__context__


def storage_error_message(err: BaseException | None) -> str | None:
    """One line for a full disk or read-only storage anywhere in `err`'s chain, else None.

    (Lightning's TensorBoard logger re-raises a failed event write as "you tried to log
    <value> which is currently not supported"; the cause is the storage error.)
    """
    for cause in _causes(err):
        if not isinstance(cause, OSError) or cause.errno not in (*_NO_SPACE, *_READ_ONLY):
            continue
        where = f" {cause.filename}" if cause.filename else ""
        if cause.errno in _NO_SPACE:
            return (
                f"no space left on the device to write{where}: free space there, or point "
                "trainer.logger.init_args.save_dir (and checkpoint.dirpath) at another disk; "
                "the checkpoints already written are intact"
            )
        return (
            f"cannot write{where}: the storage is read-only ({cause.strerror}); point "
            "trainer.logger.init_args.save_dir (and checkpoint.dirpath) at a writable folder"
        )
    return None


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


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
    """Turns a `UserInputError` (however wrapped), a full disk or read-only storage into one
    ``error:`` line and exit status 2; any other exception propagates with its traceback."""
    try:
        yield
    except Exception as err:
        user_error = find_user_error(err)
        message = user_message(user_error) if user_error else storage_error_message(err)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2) from None


@rank_zero_only
def say(message: str) -> None:
    """One line on stderr, above a running progress bar rather than glued onto it."""
    try:
        from tqdm import tqdm

        tqdm.write(message, file=sys.stderr)
    except ImportError:  # pragma: no cover - tqdm comes with lightning
        print(message, file=sys.stderr)
