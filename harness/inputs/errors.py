"""The two kinds of trouble an input can be in, kept apart on purpose.

``InputError``: nothing sensible can be checked at all; the CLI exits 2 with its one line.
``WeightsError``: one weights file is corrupt, truncated or hostile; recorded on the file and
reported by ``weights-readable`` while the rest of the report still runs.
"""

from __future__ import annotations


class InputError(Exception):
    """The input cannot be read at all. ``str(err)`` is one line: the file, what is wrong, the fix."""




class WeightsError(ValueError):
    """A weights file is corrupt, truncated or hostile (recorded, reported by ``weights-readable``)."""



class UnusableInput(InputError):
    """An input turned out unusable while running (its model code needs the network, say): the run stops and
    the shells answer with this one line (exit 2), as for any unreadable input."""
