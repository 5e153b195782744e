"""One error type for user mistakes, one warning type for things a user should know.

The CLI prints a :class:`BicmError` as a single line and exits with code 2; a
:class:`BicmWarning` is printed as a single ``warning:`` line and work goes on.
Anything else that escapes is a bug in bicm and keeps its traceback.
"""

from __future__ import annotations

import warnings

__all__ = ["BicmError", "BicmWarning", "warn"]


class BicmError(Exception):
    """A mistake in what the user asked for or passed in (bad file, bad option, ...)."""


class BicmWarning(UserWarning):
    """Something the user should know about, which does not stop the work."""


def warn(message: str, stacklevel: int = 2) -> None:
    """Emit a :class:`BicmWarning` (shown by the CLI as one ``warning:`` line)."""
    warnings.warn(message, BicmWarning, stacklevel=stacklevel + 1)
