"""The two kinds of trouble an input can be in, kept apart on purpose.

``InputError``: nothing sensible can be checked at all; the CLI exits 2 with its one line.
``WeightsError``: one weights file is corrupt, truncated or hostile; recorded on the file and
reported by ``weights-readable`` while the rest of the report still runs.
"""

from __future__ import annotations

MAX_INPUT_ERROR_CHARS = 1000  # the exit-2 line: a file name, what is wrong, the fix


class InputError(Exception):
    """The input cannot be read at all. ``str(err)`` is one line: the file, what is wrong, the fix.

    The text is made safe to print where it is made: file and tensor names come from the input, so
    control characters (ESC, NUL, BEL, newlines) are shown as escapes (one line) and the line is cut, whichever
    shell (CLI, plugin, a user's script) prints it.
    """

    def __init__(self, message: object = "") -> None:
        from harness.report import printable

        super().__init__(printable(str(message), MAX_INPUT_ERROR_CHARS))


class WeightsError(ValueError):
    """A weights file is corrupt, truncated or hostile (recorded, reported by ``weights-readable``)."""


class UnusableInput(InputError):
    """An input turned out unusable while running (its model code needs the network, say): the run stops and
    the shells answer with this one line (exit 2), as for any unreadable input."""
