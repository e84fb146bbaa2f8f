"""`RefinerArgumentParser`: LightningCLI's parser, reporting a bad option as one line.

Used by ``cli.py`` and by every other entry point that parses a config
(``python -m refiner_pl.export``, ``python -m refiner_pl.analysis.*``).
"""

from __future__ import annotations

import os
import re
import sys
from typing import NoReturn

from lightning.pytorch.cli import LightningArgumentParser

__all__ = ["RefinerArgumentParser", "one_line"]


class RefinerArgumentParser(LightningArgumentParser):
    """Reports a bad option or config value as a single ``error: ...`` line (exit status 2).

    Set the environment variable ``JSONARGPARSE_DEBUG=true`` for jsonargparse's full report.
    """

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error or "JSONARGPARSE_DEBUG" in os.environ:
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        sys.stderr.write(f"error: {one_line(message)} (see: {prog} --help)\n")
        self.exit(2)


def one_line(message: str) -> str:
    """Condenses jsonargparse's nested multi-line report to ``key.path: first reason``."""
    keys: list[str] = []
    reason = given = None
    for raw in message.splitlines():
        line = raw.strip().lstrip("-").strip()
        match = re.match(r'Parser key "([^"]+)":\s*(.*)$', line)
        if match and reason is None:
            keys.append(match.group(1))
            reason = match.group(2) or None
        elif line.startswith("Given value:"):
            given = given or line.removeprefix("Given value:").strip()
        elif line and reason is None and not line.startswith(_NOISE):
            reason = line
    if not keys:
        return " ".join(message.split())
    text = f"{'.'.join(keys)}: {reason or 'invalid value'}"
    if given and "Got value" not in text and not given.startswith(("NestedArg(", "{", "[")):
        text += f" (got {given!r})"
    return text


_NOISE = (
    "Does not validate against any of the",
    "Subtypes:",
    "Errors:",
    "Given value",
    "Expected a <class 'NoneType'>",
    "Problem with given class_path",
)
